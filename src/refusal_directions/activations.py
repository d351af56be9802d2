"""Batched caching of the residual stream entering every decoder layer.

For each prompt we keep the residual stream at the last ``n_positions`` token positions
(the post-instruction tokens), entering every layer, in float32 on the CPU:
``[n_prompts, n_positions, n_layers, d_model]``. Prompts are left-padded, so the last positions
of every row are real tokens. Only one batch of hidden states is alive at a time; the output
tensor is preallocated, so memory is the cache itself plus one batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .hooks import Hook, apply_hooks
from .models import ModelAdapter


def default_positions(adapter: ModelAdapter) -> list[int]:
    """The post-instruction token positions, as negative offsets: [-len(eoi), ..., -1]."""
    return list(range(-len(adapter.eoi_token_ids), 0))


@torch.inference_mode()
def cache_activations(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    positions: Sequence[int],
    batch_size: int = 32,
    desc: str = "activations",
) -> tuple[Tensor, Tensor]:
    """Residual stream entering every layer at ``positions`` (negative offsets from the end).

    Returns float32 ``[len(instructions), len(positions), n_layers, d_model]`` on the CPU, and
    the baseline refusal score of each prompt ``[len(instructions)]`` (computed from the same
    forward pass, for the train-prompt filter).
    """
    positions = list(positions)
    if not positions or max(positions) >= 0:
        raise ValueError(f"positions must be negative offsets from the end of the prompt, got {positions}")
    index = torch.tensor(positions)
    out = torch.empty(len(instructions), len(positions), adapter.n_layers, adapter.d_model, dtype=torch.float32)
    scores = torch.empty(len(instructions), dtype=torch.float32)
    rows = slice(0, 0)

    def recorder(layer: int):
        def record(x: Tensor) -> None:
            out[rows, :, layer] = x[:, index.to(x.device)].float().cpu()

        return record

    hooks = [Hook(adapter.layers[layer], "input", recorder(layer)) for layer in range(adapter.n_layers)]
    with apply_hooks(hooks), tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(instructions), batch_size):
            batch = instructions[start : start + batch_size]
            rows = slice(start, start + len(batch))
            enc = adapter.encode_instructions(batch)
            if enc["input_ids"].shape[1] < -min(positions):
                raise ValueError(f"Prompts are shorter than {-min(positions)} tokens; use fewer positions.")
            logits = adapter.last_logits(enc)
            scores[rows] = refusal_score(logits, adapter.refusal_token_ids).cpu()
            bar.update(len(batch))
    return out, scores


def refusal_score(logits: Tensor, refusal_token_ids: Sequence[int], eps: float = 1e-8) -> Tensor:
    """log(p + eps) - log(1 - p + eps) with p the total probability of the refusal tokens.

    logits: [..., vocab] at the last prompt position -> [...] float32.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    p = probs[..., list(refusal_token_ids)].sum(-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)

"""KL divergence of an intervened model from the unmodified one, on the baseline's own completions.

For each harmless prompt, the sequence is the chat-formatted prompt followed by the first
``n_tokens`` tokens of the baseline model's completion (teacher-forced). At every position that
predicts a completion token (the last prompt position predicts the first), both models' next-token
distributions are compared: ``KL(baseline || intervened)`` in float32 over the whole vocabulary.

Reported per prompt: the first-token KL (selection's proxy, at the answer's start) and the mean KL
per token over the scored positions. Both forwards of a batch run back to back (the intervention's
hooks on for the second only), so no baseline distribution is ever stored.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..models import ModelAdapter
from ..selection import kl_divergence


@dataclass
class CompletionKL:
    """Per-prompt KL(baseline || intervened): ``first_token[i]``, ``mean_per_token[i]`` over ``n_tokens[i]``."""

    first_token: list[float]
    mean_per_token: list[float]
    n_tokens: list[int]
    max_completion_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sequences(adapter: ModelAdapter, prompts: Sequence[str], completions: Sequence[str], n_tokens: int
               ) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + first ``n_tokens`` completion tokens, and each prompt's length."""
    sequences, prompt_lengths = [], []
    for prompt, completion in zip(prompts, completions):
        p = adapter.tokenizer(adapter.format_prompt(prompt), add_special_tokens=False)["input_ids"]
        c = adapter.tokenizer(completion, add_special_tokens=False)["input_ids"][:n_tokens]
        sequences.append(list(p) + list(c))
        prompt_lengths.append(len(p))
    return sequences, prompt_lengths


@torch.inference_mode()
def completion_kl(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    completions: Sequence[str],
    intervened: Callable[[], AbstractContextManager],
    *,
    n_tokens: int = 32,
    batch_size: int = 8,
    desc: str = "KL",
) -> CompletionKL:
    """KL(baseline || intervened) on (prompt, baseline completion) pairs; see the module docstring.

    ``intervened()``: a fresh context manager that applies the intervention (hooks) while open.
    Right-padded batches: under causal attention no real token sees the padding after it.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    sequences, starts = _sequences(adapter, prompts, completions, n_tokens)
    first, mean, count = [0.0] * len(prompts), [0.0] * len(prompts), [0] * len(prompts)
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = order[b : b + batch_size]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        inputs = {"input_ids": ids.to(adapter.input_device), "attention_mask": mask.to(adapter.input_device)}
        # Positions predicting completion tokens: start-1 .. len-2 (start-1 alone when it is empty).
        spans = [(starts[i] - 1, max(starts[i], len(sequences[i]) - 1)) for i in batch]
        base = adapter.model(**inputs, use_cache=False).logits
        picked = [base[row, lo:hi] for row, (lo, hi) in enumerate(spans)]
        del base
        with intervened():
            new = adapter.model(**inputs, use_cache=False).logits
        for row, (i, (lo, hi)) in enumerate(zip(batch, spans)):
            kl = kl_divergence(picked[row], new[row, lo:hi]).double().cpu()
            first[i], mean[i], count[i] = float(kl[0]), float(kl.mean()), int(kl.numel())
        del new
    return CompletionKL(first, mean, count, n_tokens)

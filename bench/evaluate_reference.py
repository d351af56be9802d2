"""The evaluate stage's KL as it was before it ran on ``prefix_scorer`` (commit c307cc2), for
``bench/evaluate_passes.py``: whole padded sequences through ``model(...)``, full logits at every
position, the baseline's logits of each batch kept for reuse. Not used by the package."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Sequence

import torch

from refusal_directions.evaluation.divergence import REUSE_LIMIT_BYTES, CompletionKL, _scored_span, _sequences
from refusal_directions.models import ModelAdapter
from refusal_directions.selection import kl_divergence


@torch.inference_mode()
def reference_completion_kl(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    completions: Sequence[str],
    intervened: Callable[[], AbstractContextManager] | None,
    *,
    n_tokens: int = 32,
    batch_size: int = 8,
    desc: str = "KL",
    reuse: dict | None = None,
) -> CompletionKL:
    """KL(baseline || intervened) on (prompt, baseline completion) pairs, as ``divergence.completion_kl`` was.

    ``intervened()``: a fresh context manager that applies the intervention (hooks) while open;
    None: the unmodified model itself, whose KL is exactly 0 (nothing is computed).
    ``reuse``: a dict the caller keeps across calls with the same prompts and completions (one per
    intervention): the baseline's logits of each batch are stored there once (up to
    ``REUSE_LIMIT_BYTES``) and reused, so later calls run the intervened forward only.
    Right-padded batches: under causal attention no real token sees the padding after it.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    sequences, starts = _sequences(adapter, prompts, completions, n_tokens)
    first, mean, count = [0.0] * len(prompts), [0.0] * len(prompts), [0] * len(prompts)
    if intervened is None:
        count = [hi - lo for lo, hi in map(_scored_span, starts, sequences)]
        return CompletionKL(first, mean, count, n_tokens)
    stored = _reuse_slot(reuse, adapter, sequences, starts, batch_size)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        inputs = _right_padded(adapter, [sequences[i] for i in batch])
        spans = [_scored_span(starts[i], sequences[i]) for i in batch]
        picked = stored.get(b) if stored is not None else None
        if picked is None:
            base = adapter.model(**inputs, use_cache=False).logits
            picked = [base[row, lo:hi].clone() for row, (lo, hi) in enumerate(spans)]
            del base
            if stored is not None:
                stored[b] = picked
        with intervened():
            new = adapter.model(**inputs, use_cache=False).logits
        for row, (i, (lo, hi)) in enumerate(zip(batch, spans)):
            kl = kl_divergence(picked[row], new[row, lo:hi]).double().cpu()
            first[i], mean[i], count[i] = float(kl[0]), float(kl.mean()), int(kl.numel())
        del new
    return CompletionKL(first, mean, count, n_tokens)


def _reuse_slot(reuse: dict | None, adapter: ModelAdapter, sequences: list[list[int]], starts: list[int],
                batch_size: int) -> dict | None:
    """The per-batch store of baseline logits for these exact sequences in ``reuse`` (None: too large or no reuse)."""
    if reuse is None:
        return None
    vocab = int(adapter.lm_head.weight.shape[0]) if getattr(adapter.lm_head, "weight", None) is not None else 0
    scored = sum(hi - lo for lo, hi in map(_scored_span, starts, sequences))
    if not vocab or scored * vocab * 4 > REUSE_LIMIT_BYTES:
        return None
    key = (tuple(map(tuple, sequences)), tuple(starts), batch_size)
    return reuse.setdefault(key, {})


def _right_padded(adapter: ModelAdapter, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, max length] of right-padded ``sequences``, on the input device."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), adapter.pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(adapter.input_device), "attention_mask": mask.to(adapter.input_device)}

"""KL divergence of an intervened model from the unmodified one, on the baseline's own completions.

For each harmless prompt, the sequence is the chat-formatted prompt followed by the first
``n_tokens`` tokens of the baseline model's completion (teacher-forced). At every position that
predicts a completion token (the last prompt position predicts the first), both models' next-token
distributions are compared: ``KL(baseline || intervened)`` in float32 over the whole vocabulary.

Reported per prompt: the first-token KL (selection's proxy, at the answer's start) and the mean KL
per token over the scored positions. The baseline's logits at the scored positions of a chunk of
prompts (all of them unless they exceed ``REUSE_LIMIT_BYTES``) are computed first and held, then the
intervened model's, batch by batch.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..models import ModelAdapter
from ..selection import kl_divergence
from .prefix_scorer import check_head, iter_final_hidden, project_to_logits


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


REUSE_LIMIT_BYTES = 4 * 2**30  # baseline logits held at once (and kept for reuse across interventions), at most


@torch.inference_mode()
def completion_kl(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    completions: Sequence[str],
    intervened: Callable[[], AbstractContextManager] | None,
    *,
    n_tokens: int = 32,
    batch_size: int = 8,
    desc: str = "KL",
    reuse: dict | None = None,
    share_prefix: bool = True,
) -> CompletionKL:
    """KL(baseline || intervened) on (prompt, baseline completion) pairs; see the module docstring.

    ``intervened()``: a fresh context manager that applies the intervention (hooks) while open;
    None: the unmodified model itself, whose KL is exactly 0 (nothing is computed).
    Both models' logits come from ``prefix_scorer.iter_final_hidden`` (the prompts' common opening
    computed once with ``share_prefix``, the LM head only at the scored positions): the baseline's
    for as many prompts as ``REUSE_LIMIT_BYTES`` allows, then the intervened model's for them.
    ``reuse``: a dict the caller keeps across calls with the same prompts and completions (one per
    intervention): when every prompt's baseline logits fit, they are kept there and later calls
    run the intervened forward only.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    sequences, starts = _sequences(adapter, prompts, completions, n_tokens)
    spans = [_scored_span(start, seq) for start, seq in zip(starts, sequences)]
    first, mean, count = [0.0] * len(prompts), [0.0] * len(prompts), [hi - lo for lo, hi in spans]
    if intervened is None:
        return CompletionKL(first, mean, count, n_tokens)
    check_head(adapter)
    scorer = functools.partial(_span_logits, adapter, sequences, spans, batch_size=batch_size,
                               share_prefix=share_prefix, desc=desc)
    chunks = _chunks(adapter, spans)
    keep = reuse is not None and len(chunks) == 1
    key = (tuple(map(tuple, sequences)), tuple(starts))
    for chunk in chunks:
        base = reuse.get(key) if keep else None
        if base is None:
            base = dict(scorer(chunk))
            if keep:
                reuse[key] = base
        with intervened():
            for i, new in scorer(chunk):
                kl = kl_divergence(base[i], new).double().cpu()
                first[i], mean[i] = float(kl[0]), float(kl.mean())
    return CompletionKL(first, mean, count, n_tokens)


def _scored_span(start: int, sequence: Sequence[int]) -> tuple[int, int]:
    """Positions ``[lo, hi)`` predicting completion tokens: start-1 .. len-2 (start-1 alone when it is empty)."""
    return start - 1, max(start, len(sequence) - 1)


def _span_logits(adapter: ModelAdapter, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                 members: Sequence[int], *, batch_size: int, share_prefix: bool, desc: str) -> Iterator[tuple[int, Tensor]]:
    """``(i, float32 logits [hi - lo, vocab])`` at the scored span of each sequence ``i`` in ``members``,
    under whatever hooks are active; all members form one group (their common opening is shared)."""
    positions = [list(range(*spans[i])) for i in members]
    for batch, hidden in iter_final_hidden(adapter, [sequences[i] for i in members], positions, groups=[0] * len(members),
                                           batch_size=batch_size, share_prefix=share_prefix, desc=desc):
        logits = project_to_logits(adapter, torch.cat(hidden)).split([len(h) for h in hidden])
        yield from ((members[j], row) for j, row in zip(batch, logits))


def _chunks(adapter: ModelAdapter, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Consecutive prompt indices in chunks whose baseline logits fit in ``REUSE_LIMIT_BYTES`` (at least one each)."""
    row_bytes = 4 * int(adapter.lm_head.weight.shape[0]) if getattr(adapter.lm_head, "weight", None) is not None else 0
    chunks: list[list[int]] = [[]]
    held = 0
    for i, (lo, hi) in enumerate(spans):
        if chunks[-1] and held + (hi - lo) * row_bytes > REUSE_LIMIT_BYTES:
            chunks.append([])
            held = 0
        chunks[-1].append(i)
        held += (hi - lo) * row_bytes
    return chunks

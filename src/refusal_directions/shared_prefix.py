"""The shared prompt prefix: the chat template's common opening computed once per batch, not per prompt.

Every chat-formatted prompt of a set usually starts with the same tokens (Qwen2.5's default system
prompt and the user turn's opening are 30 of about 43 tokens). Under causal attention the states of
those tokens do not depend on what follows, and every intervention of this package acts position by
position, so their keys and values are the same for every prompt of a batch: they are computed once
(batch 1) into a KV cache that the batch shares, and only the suffixes run batched.

Numbers equal those of the padded full-sequence forward up to float rounding: here the real tokens
of every prompt sit at positions 0..n-1 (padding goes between prefix and suffix, masked), while left
padding shifts a whole prompt by its pad count, to which rotary position embeddings are invariant.
``verified_split`` checks this on the model before it is used (``SharedPrefixError`` otherwise), and
the callers fall back to full sequences.

Shapes: a batch of B prompts with a shared prefix of P tokens and suffixes padded to S tokens:
``prefix`` [1, P]; ``input_ids`` [B, S]; ``attention_mask`` [B, P + S]; ``position_ids`` [B, S].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

MIN_PREFIX_TOKENS = 8  # below this the saving does not pay for the extra bookkeeping
# What a failed check may raise besides ``SharedPrefixError``: a model whose layers do not take a
# shared cache this way (callers then fall back to full sequences).
CHECK_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError)


class SharedPrefixError(RuntimeError):
    """The shared-prefix computation does not reproduce the full-sequence one on this model."""


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``sequences``, leaving every sequence at least one token.

    Compares list slices (C-speed) and narrows the prefix by bisection at each sequence that
    departs from it: thousands of ARC sequences share a ~700-token few-shot prefix, which a
    token-by-token Python loop takes a noticeable part of a second to confirm on every call.
    """
    if not sequences:
        return 0
    rows = [s if isinstance(s, list) else list(s) for s in sequences]
    first = rows[0]
    n = min(len(s) for s in rows) - 1
    for row in rows[1:]:
        if n <= 0:
            return 0
        if row[:n] == first[:n]:
            continue
        low, high = 0, n - 1  # the answer lies in [low, high]: row[:n] differs
        while low < high:
            mid = (low + high + 1) // 2
            if row[:mid] == first[:mid]:
                low = mid
            else:
                high = mid - 1
        n = low
    return max(n, 0)


@dataclass
class SplitBatch:
    """A batch as a shared prefix [1, P] and left-padded suffixes (see the module docstring for shapes)."""

    prefix: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def suffix_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the model's forward for the suffixes (the cache is added by the caller)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def split_batch(sequences: Sequence[Sequence[int]], prefix_length: int, pad_id: int, device: torch.device) -> SplitBatch:
    """``sequences`` (token ids, each starting with the same ``prefix_length`` tokens) as a ``SplitBatch``."""
    if prefix_length < 1 or any(len(s) <= prefix_length for s in sequences):
        raise ValueError("every sequence needs the shared prefix and at least one token after it")
    prefix = torch.as_tensor(list(sequences[0][:prefix_length]), dtype=torch.long)[None]
    suffixes = [list(s[prefix_length:]) for s in sequences]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix):] = torch.as_tensor(suffix)
        mask[row, width - len(suffix):] = 1
    positions = prefix_length + (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([torch.ones((len(suffixes), prefix_length), dtype=torch.long), mask], dim=1)
    return SplitBatch(prefix.to(device), ids.to(device), full_mask.to(device), positions.to(device))


def shareable_split(sequences: Sequence[Sequence[int]], model: torch.nn.Module, pad_id: int, device: torch.device,
                    extra_tokens: int = 0) -> SplitBatch | None:
    """``sequences`` as a ``SplitBatch`` when their common prefix is worth sharing (at least
    ``MIN_PREFIX_TOKENS``) and no sliding window of ``model`` is shorter than the longest sequence plus
    ``extra_tokens`` (tokens still to be generated); else None."""
    n = common_prefix_length(sequences)
    if n < MIN_PREFIX_TOKENS or not windows_allow(model, max(len(s) for s in sequences) + extra_tokens):
        return None
    return split_batch(sequences, n, pad_id, device)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes a KV cache ("cache" in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: torch.nn.Module):
    """An empty dynamic KV cache laid out for ``model`` (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def prefix_cache(model: torch.nn.Module, prefix: Tensor, batch_size: int):
    """The KV cache of ``prefix`` [1, P] under whatever hooks or weights are active, repeated ``batch_size`` times."""
    cache = new_cache(model)
    model(input_ids=prefix, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    cache.batch_repeat_interleave(batch_size)
    return cache


def windows_allow(model: torch.nn.Module, length: int) -> bool:
    """Whether no layer of ``model`` attends in a sliding window shorter than ``length`` tokens.

    Windows count cache slots, and the padding between prefix and suffix takes slots that left
    padding (before the whole prompt) does not: within shorter windows the results would differ.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    return all(not isinstance(w, int) or w >= length for w in windows)


def tolerance(dtype: torch.dtype) -> float:
    """Largest max-abs difference of log-probabilities accepted between shared-prefix and full forwards."""
    return 1e-3 if dtype == torch.float32 else 0.1


def check_close(shared: Tensor, full: Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise ``SharedPrefixError`` when next-token log-probabilities ``shared`` and ``full`` [B, V] differ."""
    diff = float((torch.log_softmax(shared.float(), -1) - torch.log_softmax(full.float(), -1)).abs().max())
    if not diff <= tolerance(dtype):
        raise SharedPrefixError(f"{what}: shared-prefix log-probabilities differ from the full forward by {diff:.2e} "
                                f"(tolerance {tolerance(dtype):.0e})")

"""Batched greedy generation (left padding), under whatever intervention the caller installed."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .models import ModelAdapter

log = logging.getLogger(__name__)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def stop_token_ids(adapter: ModelAdapter) -> list[int]:
    """EOS ids of the generation config and the tokenizer, plus the template's end-of-turn token."""
    ids: list[int] = []
    for source in (getattr(adapter.model, "generation_config", None), adapter.model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if adapter.tokenizer.eos_token_id is not None:
        ids.append(adapter.tokenizer.eos_token_id)
    ids.append(adapter.eoi_token_ids[0])  # the template's end-of-user-turn token also ends assistant turns
    return sorted(set(ids))


def generate(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int = 32,
    desc: str = "generate",
    cache_implementation: str | None = None,
) -> list[str]:
    """Greedy completions (decoded, stripped) of chat-formatted ``instructions``, in input order."""
    ids = generate_tokens(adapter, instructions, max_new_tokens, batch_size, desc, cache_implementation)
    return [adapter.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


@torch.inference_mode()
def generate_tokens(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int = 32,
    desc: str = "generate",
    cache_implementation: str | None = None,
) -> list[list[int]]:
    """Greedy new-token ids of chat-formatted ``instructions``, in input order, cut after the stop token.

    Prompts are sorted by length so each batch has little padding. On out-of-memory the batch
    size is halved (with a warning) and the batch retried. ``cache_implementation="static"``
    preallocates the KV cache, which lets transformers compile the decoding step on GPU.
    """
    if cache_implementation == "static":
        from torch import _dynamo

        # A compiled decoding step must not silently ignore hooks changed after compilation:
        # guard on them (recompiling) instead. Pipelines use persistent slot hooks, which never change.
        _dynamo.config.skip_nnmodule_hook_guards = False
    prompts = adapter.format_prompts(instructions)
    lengths = [len(adapter.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    responses: list[list[int]] = [[] for _ in prompts]
    eos = stop_token_ids(adapter)
    pad = adapter.tokenizer.pad_token_id
    stop = set(eos)
    start = 0
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        while start < len(order):
            idx = order[start : start + batch_size]
            enc = adapter.encode([prompts[i] for i in idx])
            try:
                out = adapter.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                    temperature=None, top_p=None, top_k=None,
                    **({"cache_implementation": cache_implementation} if cache_implementation else {}),
                )
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("Out of memory while generating; retrying with batch size %d.", batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :].tolist()):
                ends = [j for j, t in enumerate(row) if t in stop]
                responses[i] = row[: ends[0] + 1] if ends else row
            start += len(idx)
            bar.update(len(idx))
    return responses

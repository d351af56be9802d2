"""How attention runs while the scorer (``prefix_scorer.iter_final_hidden``) calls the decoder.

Same results, less memory traffic; both changes last for one decoder forward (``scoring_forward``).

1. **Grouped-query attention without copying keys and values.** When a batch has an attention
   mask (every padded batch does), transformers' SDPA path copies each key/value head ``n_rep``
   times (``repeat_kv``) before ``scaled_dot_product_attention``, because PyTorch's masked
   kernels take no grouped heads. For a batch of suffixes reading a cached 5-shot prefix that is
   ``n_rep`` copies of the whole KV cache in every layer (4 for Llama-3-8B, 7 for Qwen2.5-0.5B),
   and the kernel then reads all of them. ``grouped_query_sdpa`` instead stacks the ``n_rep``
   query heads that share a key/value head along the query axis,
   ``[B, H, T, D] -> [B, H_kv, n_rep * T, D]``, repeats the (much smaller) mask to match, and
   attends once per key/value head. Query rows are independent in attention, so the output is the
   same up to rounding. (transformers does the same for one-token queries: ``pack_gqa``.)
2. **No cuDNN attention on CUDA.** PyTorch's cuDNN backend, which SDPA prefers on Hopper for
   masked attention, builds an execution plan for every new input shape (~40 ms, at times ~1 s,
   on an H200), and padded scoring batches come in hundreds of shapes; the flash and
   memory-efficient backends have no such cost.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# keyword arguments that change what attention computes; with any of them set, transformers' own function runs
_SPECIAL_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def grouped_query_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    fallback: Callable,
    stacked_masks: dict | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function (the ``"sdpa"`` signature) for masked grouped-query attention.

    ``query [B, H, T, D]``, ``key``/``value [B, H_kv, K, D]``, ``attention_mask [B or 1, 1, T, K]``
    (bool or additive). Returns ``([B, T, H, D_v], None)`` as transformers expects. Calls that are
    not masked grouped-query attention over several query tokens (or that carry soft-capping,
    position biases, attention sinks or dropout) go to ``fallback`` unchanged. ``stacked_masks``
    keeps each mask's repeated form for the next layers of the same forward (they share the mask).
    """
    batch, n_heads, q_len, _ = query.shape
    n_kv = key.shape[1]
    plain = (
        n_kv == n_heads
        or n_heads % n_kv
        or q_len == 1
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or dropout
        or any(kwargs.get(name) is not None for name in _SPECIAL_KWARGS)
    )
    if plain:
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    n_rep = n_heads // n_kv
    stacked = query.reshape(batch, n_kv, n_rep * q_len, query.shape[-1])
    key_of_mask = (id(attention_mask), n_rep)
    if stacked_masks is not None and key_of_mask in stacked_masks:
        mask = stacked_masks[key_of_mask][1]
    else:
        mask = attention_mask[:, :, None].expand(-1, -1, n_rep, -1, -1)
        mask = mask.reshape(attention_mask.shape[0], 1, n_rep * q_len, attention_mask.shape[-1])
        if stacked_masks is not None:
            stacked_masks[key_of_mask] = (attention_mask, mask)  # the original kept alive: its id stays unique
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, n_heads, q_len, value.shape[-1]).transpose(1, 2).contiguous(), None


@contextmanager
def _grouped_query_attention() -> Iterator[None]:
    """transformers' ``"sdpa"`` attention replaced by ``grouped_query_sdpa`` inside the block
    (in the registry's local overrides, which the models consult first)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_override = "sdpa" in local
    previous = local.get("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    stacked_masks: dict = {}

    def attention(*args, **kwargs):
        return grouped_query_sdpa(*args, fallback=original, stacked_masks=stacked_masks, **kwargs)

    local["sdpa"] = attention
    try:
        yield
    finally:
        if had_override:
            local["sdpa"] = previous
        else:
            local.pop("sdpa", None)


def scoring_forward(decoder: nn.Module, device: torch.device) -> Callable:
    """``decoder``'s forward with the attention changes of the module doc in effect during each call."""

    def forward(**kwargs):
        with _grouped_query_attention():
            if device.type != "cuda":
                return decoder(**kwargs)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return decoder(**kwargs)

    return forward

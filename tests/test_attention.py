from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from refusal_directions.evaluation import attention
from refusal_directions.evaluation.attention import grouped_query_sdpa, scoring_forward
from tiny import make_adapter


class Module(torch.nn.Module):
    num_key_value_groups = 3


def reference(query, key, value, mask, scaling=None):
    """transformers' masked path: every key/value head repeated, then one SDPA call."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2)


def never(*args, **kwargs):
    raise AssertionError("fallback called")


def inputs(batch=3, heads=6, kv_heads=2, q_len=5, k_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, 8, generator=g)
    key = torch.randn(batch, kv_heads, k_len, 8, generator=g)
    value = torch.randn(batch, kv_heads, k_len, 8, generator=g)
    mask = torch.rand(batch, 1, q_len, k_len, generator=g) > 0.3
    mask[..., 0] = True  # every query attends to something
    return query, key, value, mask


def test_grouped_query_sdpa_equals_repeated_heads_with_bool_and_additive_masks():
    query, key, value, mask = inputs()
    out, weights = grouped_query_sdpa(Module(), query, key, value, mask, scaling=0.3, fallback=never)
    assert weights is None and out.shape == (3, 5, 6, 8)
    torch.testing.assert_close(out, reference(query, key, value, mask, 0.3), atol=1e-5, rtol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:1]  # batch-broadcast float mask
    out, _ = grouped_query_sdpa(Module(), query, key, value, additive, fallback=never)
    torch.testing.assert_close(out, reference(query, key, value, additive), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["no mask", "one query token", "equal heads", "soft-capping", "dropout"],
)
def test_grouped_query_sdpa_leaves_other_calls_to_transformers(case):
    query, key, value, mask = inputs(q_len=1 if case == "one query token" else 5, kv_heads=6 if case == "equal heads" else 2)
    calls = []

    def fallback(module, q, k, v, m, **kwargs):
        calls.append(kwargs)
        return "fallback", None

    kwargs = {"softcap": 50.0} if case == "soft-capping" else {"dropout": 0.1} if case == "dropout" else {}
    out, _ = grouped_query_sdpa(Module(), query, key, value, None if case == "no mask" else mask, fallback=fallback, **kwargs)
    assert out == "fallback" and len(calls) == 1


def test_scoring_forward_swaps_sdpa_only_during_the_forward():
    adapter = make_adapter("llama", n_layers=2)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []
    layer = adapter.model.get_decoder().layers[0]
    handle = layer.register_forward_hook(lambda *args: seen.append(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    try:
        forward = scoring_forward(adapter.model.get_decoder(), torch.device("cpu"))
        forward(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    finally:
        handle.remove()
    assert seen and seen[0] is not original
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original and "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_repeated_mask_is_built_once_per_mask_and_reused():
    query, key, value, mask = inputs()
    memo: dict = {}
    first, _ = grouped_query_sdpa(Module(), query, key, value, mask, fallback=never, stacked_masks=memo)
    second, _ = grouped_query_sdpa(Module(), query, key, value, mask, fallback=never, stacked_masks=memo)
    assert len(memo) == 1 and torch.equal(first, second)
    other = mask.clone()
    other[..., 1] = False
    third, _ = grouped_query_sdpa(Module(), query, key, value, other, fallback=never, stacked_masks=memo)
    assert len(memo) == 2
    torch.testing.assert_close(third, reference(query, key, value, other), atol=1e-5, rtol=1e-5)

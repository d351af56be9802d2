"""The prefix-sharing token scorer (``evaluation.prefix_scorer``): batching, shared prefixes,
packed suffixes and non-finite logits give every sequence the scores it has alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from refusal_directions.evaluation import attention
from refusal_directions.evaluation.prefix_scorer import (
    LOGIT_LIMIT,
    _batches,
    _can_pack,
    _plan,
    _safe_log_softmax,
    check_head,
    iter_final_hidden,
    sequence_logprobs,
)
from refusal_directions.models import ModelAdapter
from tiny import ARCHITECTURES, make_adapter


def token_ids(adapter: ModelAdapter, text: str) -> list[int]:
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return make_adapter("qwen2", n_layers=2)


def test_nonfinite_logits_are_counted_and_clamped(adapter):
    ids = token_ids(adapter, "some words to score here")

    def poison(module, args, output):  # NaN hidden state at position 3 -> NaN logits there
        output = output.clone()
        output[:, 3] = float("nan")
        return output

    handle = adapter.final_norm.register_forward_hook(poison)
    try:
        scores = sequence_logprobs(adapter, [ids], [1], share_prefix=False)
    finally:
        handle.remove()
    assert int(scores.n_nonfinite[0]) == 1
    assert math.isfinite(float(scores.logprob_sums[0]))


def _sanitized_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The documented rule, on every row: NaN -> 0, +-inf -> +-limit, clamp, log-softmax."""
    fixed = torch.nan_to_num(logits, nan=0.0, posinf=LOGIT_LIMIT, neginf=-LOGIT_LIMIT).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    return torch.log_softmax(fixed, dim=-1)


def test_safe_log_softmax_is_plain_on_clean_blocks_and_sanitizes_the_others():
    torch.manual_seed(0)
    clean = torch.randn(4, 50) * 8
    out, nonfinite = _safe_log_softmax(clean)
    assert torch.equal(out, torch.log_softmax(clean, dim=-1)) and not nonfinite.any()
    broken = clean.clone()
    broken[0, 3], broken[1, 7], broken[2, 9], broken[3, 1] = float("nan"), float("inf"), -float("inf"), 3 * LOGIT_LIMIT
    out, nonfinite = _safe_log_softmax(broken)
    assert nonfinite.tolist() == [True, True, True, False]  # out of range but finite: clamped, not counted
    assert torch.isfinite(out).all() and torch.equal(out, _sanitized_log_softmax(broken))
    assert out[3, 1] == pytest.approx(0.0)  # the clamped logit still dominates its row


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3_text"])
def test_shared_prefix_matches_full_sequences(arch):
    model_adapter = make_adapter(arch, n_layers=2)
    check_head(model_adapter)  # decoder + LM head (+ Gemma-2 soft-cap) == model logits
    prefix = token_ids(model_adapter, "Shared few-shot prefix text, long enough to be cached. ")
    seqs = [prefix + token_ids(model_adapter, s) for s in ("one", "second suffix", "3rd and longest suffix here")]
    starts = [len(prefix)] * 3
    plain = sequence_logprobs(model_adapter, seqs, starts, share_prefix=False, batch_size=1)
    shared = sequence_logprobs(model_adapter, seqs, starts, groups=["g"] * 3, batch_size=2)
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist()
    assert shared.logprob_sums == pytest.approx(plain.logprob_sums, abs=1e-4)
    # the prefix really was shared: one unit with a long cached prefix
    batches = list(iter_final_hidden(model_adapter, seqs, [[len(s) - 1] for s in seqs], groups=["g"] * 3, batch_size=3, max_padding=float("inf")))
    assert len(batches) == 1 and sorted(batches[0][0]) == [0, 1, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_groups_with_different_prefixes_share_batches(arch):
    """Prefixes of different lengths run left-padded in one forward; suffix rows of different
    groups then share batches, each reading its own group's prefix (positions stay right)."""
    model_adapter = make_adapter(arch, n_layers=2)
    prefixes = [token_ids(model_adapter, p) for p in ("A shared prefix of some length. ", "A shared prefix, a few tokens longer. ")]
    suffixes = ["one", "second suffix", "3rd and longest suffix here", "x y"]
    seqs, groups, starts = [], [], []
    for g, prefix in enumerate(prefixes):
        for s in suffixes[g:]:
            seqs.append(prefix + token_ids(model_adapter, s))
            groups.append(g)
            starts.append(len(prefix))
    assert len(prefixes[0]) != len(prefixes[1])
    plain = sequence_logprobs(model_adapter, seqs, starts, share_prefix=False, batch_size=1)
    shared = sequence_logprobs(model_adapter, seqs, starts, groups=groups, batch_size=4)
    assert shared.logprob_sums == pytest.approx(plain.logprob_sums, abs=1e-4)
    batches = list(iter_final_hidden(model_adapter, seqs, [[len(s) - 1] for s in seqs], groups=groups, batch_size=8, max_padding=float("inf")))
    assert len(batches) == 1 and sorted(batches[0][0]) == list(range(len(seqs)))


def test_batches_are_longest_first_with_bounded_padding():
    """At most batch_size items per batch, longest first; an item that would make padding exceed
    15% of the batch's real tokens starts a new batch."""
    lengths = [300, 100, 110, 2000, 105, 120, 400]
    batches = _batches(lengths, batch_size=3)
    assert [[lengths[i] for i in b] for b in batches] == [[2000], [400, 300], [120, 110, 105], [100]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in _batches([50] * 7, batch_size=3)] == [3, 3, 1]
    assert [len(b) for b in _batches([100, 70], batch_size=3)] == [1, 1]  # 200 padded for 170 real: over 15%
    assert [len(b) for b in _batches(lengths, batch_size=8, max_padding=float("inf"))] == [7]



def test_token_budget_closes_batches_by_padded_tokens_and_cached_context():
    """With ``max_tokens``, a batch closes before items x (longest + context) exceeds it; the count
    cap and the padding rule still apply, and an item longer than the budget gets a batch alone."""
    lengths = [100, 90, 95, 80, 85, 300]
    budget = _batches(lengths, batch_size=100, max_padding=float("inf"), max_tokens=300)
    assert [[lengths[i] for i in b] for b in budget] == [[300], [100, 95, 90], [85, 80]]
    with_context = _batches(lengths, batch_size=100, max_padding=float("inf"), max_tokens=300, context=50)
    assert [[lengths[i] for i in b] for b in with_context] == [[300], [100, 95], [90, 85], [80]]
    assert _batches(lengths, batch_size=2, max_padding=float("inf"), max_tokens=10_000) == _batches(
        lengths, batch_size=2, max_padding=float("inf"))
    assert _batches(lengths, batch_size=100, max_tokens=10_000) == _batches(lengths, batch_size=100)


def test_token_budget_batches_score_like_count_batches():
    """Token-budgeted batches (loose sequences and suffixes over cached prefixes) give the scores of
    count-limited ones; a forward's rows x (width + cached prefix) stays within the budget unless a
    single row exceeds it."""
    adapter = make_adapter("qwen2", n_layers=2)
    prefix = list(range(20, 50))
    seqs = [prefix + list(range(60, 60 + k)) for k in (3, 5, 8, 2, 7, 4)] + [list(range(100 + k, 112 + k)) for k in range(4)]
    starts = [30] * 6 + [1] * 4
    groups = ["p"] * 6 + [f"alone{k}" for k in range(4)]
    decoder = adapter.model.get_decoder()
    forwards = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rows, width = kwargs["input_ids"].shape
        forwards.append((rows, width, cache.get_seq_length() if cache is not None else 0))

    by_count = sequence_logprobs(adapter, seqs, starts, groups=groups, batch_size=2)
    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        by_tokens = sequence_logprobs(adapter, seqs, starts, groups=groups, batch_size=1000, max_tokens=40)
    finally:
        handle.remove()
    # the 29-token prefix; its 6 suffixes (35 tokens) packed in one row over it: alone, over budget;
    # the four 12-token sequences, 3 then 1 (4 x 12 > 40)
    assert forwards == [(1, 29, 0), (1, 35, 29), (3, 12, 0), (1, 12, 0)]
    torch.testing.assert_close(torch.from_numpy(by_tokens.logprob_sums), torch.from_numpy(by_count.logprob_sums), atol=1e-5, rtol=1e-5)
    assert by_tokens.n_tokens.tolist() == by_count.n_tokens.tolist()


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_and_prefix_shared_scoring_match_each_sequence_alone(arch, batch_size, monkeypatch):
    """Loose right-padded batches (no mask) and suffix batches over cached prefixes of different
    lengths (masked: grouped-query SDPA where the model has no soft-capping) give every sequence
    the hidden states it has alone, sliding windows (Gemma, 8 tokens here) included."""
    grouped_calls = []

    def counting_sdpa(query, *args, **kwargs):
        grouped_calls.append(query.shape)
        return F.scaled_dot_product_attention(query, *args, **kwargs)

    monkeypatch.setattr(attention, "F", SimpleNamespace(scaled_dot_product_attention=counting_sdpa))
    adapter = make_adapter(arch, n_layers=2)
    prefixes = [list(range(20, 50)), list(range(50, 70))]  # 28 and 19 tokens shared (scored positions start earlier)
    seqs = [prefixes[0] + [5, 6, 7], prefixes[0] + [8], prefixes[1] + [9, 10, 11, 12], prefixes[1] + [13, 14]]
    seqs += [[5, 6, 7, 8, 9, 10], [11, 12]]  # no shared prefix: loose
    groups = ["a", "a", "b", "b", "c", "d"]
    positions = [list(range(len(s))) if g in "cd" else list(range(len(s) - 3, len(s))) for s, g in zip(seqs, groups)]
    assert sorted(u.prefix_len for u in _plan(seqs, positions, groups, True, 16)) == [0, 19, 28]
    decoder = adapter.model.get_decoder()
    shapes = []
    handle = decoder.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    got = {}
    try:
        for batch, rows in iter_final_hidden(adapter, seqs, positions, groups=groups, batch_size=batch_size, max_padding=float("inf")):
            got.update(zip(batch, rows))
    finally:
        handle.remove()
    packed = _can_pack(adapter)
    assert packed is (arch not in ("gemma2", "gemma3_text"))
    if batch_size == 8:  # both prefixes, then the suffixes (5 + 3 tokens per unit): one row per unit when packed
        assert shapes == [(2, 28), (2, 8) if packed else (4, 5), (2, 6)]
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            expected = decoder(input_ids=torch.tensor([seq])).last_hidden_state[0, positions[i]]
            torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4)
    if arch != "gemma2":  # Gemma-2 soft-caps attention logits: transformers' own function runs
        assert grouped_calls and all(shape[1] == 2 for shape in grouped_calls)  # 4 query heads stacked on 2 kv heads


def test_packed_suffixes_with_eager_attention_match_each_sequence_alone():
    """The packed rows' additive 4-D mask works with eager attention too."""
    adapter = make_adapter("llama", n_layers=2)
    adapter.model.config._attn_implementation = "eager"
    prefix = list(range(20, 50))
    seqs = [prefix + [5, 6, 7], prefix + [8, 9], prefix + [10]]
    positions = [list(range(28, len(s))) for s in seqs]
    got = {}
    for batch, rows in iter_final_hidden(adapter, seqs, positions, groups=["a"] * 3, batch_size=4):
        assert len(batch) == 3  # all three suffixes in one packed row
        got.update(zip(batch, rows))
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            expected = adapter.model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0, positions[i]]
            torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4)


def test_positions_outside_a_sequence_are_refused(adapter):
    """Requested positions must lie inside their sequence (lists and ranges alike)."""
    seqs = [[5, 6, 7], [8, 9, 10, 11]]
    for bad in ([[0, 3], [1]], [[-1], [1]], [range(0, 4), [1]]):
        with pytest.raises(ValueError, match="outside"):
            list(iter_final_hidden(adapter, seqs, bad))
    ok = list(iter_final_hidden(adapter, seqs, [range(0, 3), []]))
    assert sum(len(batch) for batch, _ in ok) == 2

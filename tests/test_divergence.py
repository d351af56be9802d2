"""KL(baseline || intervened) on the baseline's own completions, teacher-forced."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from refusal_directions.evaluation.divergence import completion_kl
from refusal_directions.interventions import ActAdd, intervene
from tiny import make_adapter

PROMPTS = ["write a poem", "what is two plus two, in words please", "hi"]
COMPLETIONS = ["roses are red and violets are blue", "four", ""]


def _by_hand(adapter, prompt, completion, n_tokens, intervention):
    p = adapter.tokenizer(adapter.format_prompt(prompt), add_special_tokens=False)["input_ids"]
    c = adapter.tokenizer(completion, add_special_tokens=False)["input_ids"][:n_tokens]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        base = torch.log_softmax(adapter.model(input_ids=ids).logits[0].float(), -1)
        with intervene(adapter, intervention):
            new = torch.log_softmax(adapter.model(input_ids=ids).logits[0].float(), -1)
    rows = range(len(p) - 1, max(len(p), len(p) + len(c) - 1))
    kl = torch.stack([(base[t].exp() * (base[t] - new[t])).sum() for t in rows])
    return float(kl[0]), float(kl.mean()), len(rows)


def test_kl_equals_a_hand_computation_per_prompt():
    adapter = make_adapter("llama", n_layers=3)
    steer = ActAdd(3.0 * torch.nn.functional.normalize(torch.randn(64), dim=0), layer=1)
    got = completion_kl(adapter, PROMPTS, COMPLETIONS, lambda: intervene(adapter, steer), n_tokens=5, batch_size=2)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        first, mean, n = _by_hand(adapter, prompt, completion, 5, steer)
        assert got.first_token[i] == pytest.approx(first, rel=1e-4, abs=1e-6)
        assert got.mean_per_token[i] == pytest.approx(mean, rel=1e-4, abs=1e-6)
        assert got.n_tokens[i] == n
    assert got.n_tokens == [5, 4, 1]  # capped at 5; "four" is 4 byte tokens; an empty completion: the first token only
    assert min(got.first_token) > 0


def test_no_intervention_gives_zero():
    adapter = make_adapter("qwen2", n_layers=2)
    got = completion_kl(adapter, PROMPTS, COMPLETIONS, nullcontext, n_tokens=8, batch_size=3)
    assert max(got.mean_per_token) < 1e-6 and max(got.first_token) < 1e-6


def test_reused_baseline_logits_give_the_same_kl_with_one_forward_per_batch_less():
    adapter = make_adapter("llama", n_layers=3)
    steers = [ActAdd(s * torch.nn.functional.normalize(torch.randn(64), dim=0), layer=1) for s in (1.0, 3.0)]
    fresh = [completion_kl(adapter, PROMPTS, COMPLETIONS, lambda s=s: intervene(adapter, s), n_tokens=5, batch_size=2)
             for s in steers]
    calls = []
    handle = adapter.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    reuse: dict = {}
    try:
        reused, forwards = [], []
        for s in steers:
            before = len(calls)
            reused.append(completion_kl(adapter, PROMPTS, COMPLETIONS, lambda s=s: intervene(adapter, s), n_tokens=5,
                                        batch_size=2, reuse=reuse))
            forwards.append(len(calls) - before)
    finally:
        handle.remove()
    assert [r.to_dict() for r in reused] == [f.to_dict() for f in fresh]
    assert forwards[0] == 2 * forwards[1] > 0  # baseline + intervened forwards, then the intervened ones only


def test_the_unmodified_model_has_zero_kl_without_a_forward():
    adapter = make_adapter("llama", n_layers=3)
    computed = completion_kl(adapter, PROMPTS, COMPLETIONS, nullcontext, n_tokens=5, batch_size=2)
    skipped = completion_kl(adapter, PROMPTS, COMPLETIONS, None, n_tokens=5, batch_size=2)
    assert skipped.to_dict() == computed.to_dict()
    assert skipped.first_token == [0.0, 0.0, 0.0] and skipped.n_tokens == [5, 4, 1]

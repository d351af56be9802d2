"""The evaluate stage's teacher-forced passes over chat prompts share prefixes and reuse work, and give
the numbers of scoring every sequence whole (coherence cross-entropy, on-distribution loss, KL)."""

from __future__ import annotations

import pytest
import torch

from refusal_directions.evaluation import loss, prefix_scorer
from refusal_directions.evaluation.coherence import completion_cross_entropy
from refusal_directions.evaluation.divergence import completion_kl
from refusal_directions.interventions import ActAdd, intervene
from refusal_directions.models import ModelAdapter
from test_shared_prefix import SYSTEM_TEMPLATE
from tiny import ARCHITECTURES, make_model, make_tokenizer

PROMPTS = ["write a poem", "what is two plus two, in words please", "hi", "name a colour"]
# three interventions' answers to each prompt: some identical (scored once), one empty
ANSWERS = [["roses are red", "roses are red", "violets are blue and so on"],
           ["four", "4", "four"],
           ["", "hello there", "hello there"],
           ["blue", "red red red red red red", "green, I think"]]


def _adapter(arch: str, template: str | None = SYSTEM_TEMPLATE) -> ModelAdapter:
    torch.manual_seed(0)
    tokenizer = make_tokenizer(template) if template else make_tokenizer()
    return ModelAdapter(make_model(arch, n_layers=3), tokenizer, name=f"tiny-{arch}")


def _prefix_passes(monkeypatch) -> list[int]:
    """Counts the scorer's cached-prefix forwards (one entry per call)."""
    calls: list[int] = []
    real = prefix_scorer._prefix_cache
    monkeypatch.setattr(prefix_scorer, "_prefix_cache", lambda *a: calls.append(1) or real(*a))
    return calls


def _pairs() -> tuple[list[str], list[str]]:
    """Every intervention's answers, intervention after intervention (as the evaluate stage lists them)."""
    prompts = [p for k in range(3) for p in PROMPTS]
    answers = [ANSWERS[i][k] for k in range(3) for i in range(len(PROMPTS))]
    return prompts, answers


@pytest.mark.parametrize("arch", ARCHITECTURES + ["qwen3_moe"])
def test_coherence_ce_of_several_interventions_equals_scoring_each_completion_whole(arch, monkeypatch):
    adapter = _adapter(arch)
    prompts, answers = _pairs()
    whole = completion_cross_entropy(adapter, prompts, answers, max_completion_tokens=12, batch_size=3, share_prefix=False)
    passes = _prefix_passes(monkeypatch)
    shared = completion_cross_entropy(adapter, prompts, answers, max_completion_tokens=12, batch_size=3)
    assert passes  # the prompts were computed once per group
    assert shared.n_tokens == whole.n_tokens and shared.n_nonfinite == whole.n_nonfinite
    assert shared.ce == pytest.approx(whole.ce, rel=1e-5, abs=1e-5, nan_ok=True)
    assert shared.n_tokens[PROMPTS.index("hi")] == 0  # the empty completion keeps its place


def test_identical_completions_are_scored_once(monkeypatch):
    adapter = _adapter("qwen2")
    prompts, answers = _pairs()
    scored: list[int] = []
    real = prefix_scorer.sequence_logprobs
    monkeypatch.setattr("refusal_directions.evaluation.coherence.sequence_logprobs",
                        lambda a, sequences, *rest, **kw: scored.append(len(sequences)) or real(a, sequences, *rest, **kw))
    got = completion_cross_entropy(adapter, prompts, answers, batch_size=4)
    assert scored == [len(set(zip(prompts, answers)))] == [9]
    assert got.ce[0] == got.ce[len(PROMPTS)]  # "roses are red" twice: one score


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_on_distribution_loss_with_the_shared_template_opening_equals_whole_sequences(arch, monkeypatch):
    adapter = _adapter(arch)
    answers = [a[2] for a in ANSWERS]
    whole = loss.on_distribution_loss(adapter, PROMPTS, answers, max_length=200, batch_size=3, share_prefix=False)
    passes = _prefix_passes(monkeypatch)
    shared = loss.on_distribution_loss(adapter, PROMPTS, answers, max_length=200, batch_size=3)
    assert passes
    assert shared.doc_tokens == whole.doc_tokens and shared.n_skipped == whole.n_skipped
    assert shared.doc_losses == pytest.approx(whole.doc_losses, rel=1e-5, abs=1e-5)
    assert shared.mean_loss == pytest.approx(whole.mean_loss, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "mistral"])
def test_kl_with_the_shared_opening_equals_whole_sequences(arch, monkeypatch):
    adapter = _adapter(arch)
    steer = ActAdd(3.0 * torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0), layer=1)
    answers = [a[2] for a in ANSWERS]
    whole = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6, batch_size=3,
                          share_prefix=False)
    passes = _prefix_passes(monkeypatch)
    shared = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6, batch_size=3)
    assert passes
    assert shared.n_tokens == whole.n_tokens
    assert shared.first_token == pytest.approx(whole.first_token, rel=1e-4, abs=1e-6)
    assert shared.mean_per_token == pytest.approx(whole.mean_per_token, rel=1e-4, abs=1e-6)


def test_without_a_long_common_opening_the_scorer_falls_back_to_whole_sequences(monkeypatch):
    adapter = _adapter("llama", template=None)  # ChatML without a system prompt: a 6-token opening
    steer = ActAdd(3.0 * torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0), layer=1)
    answers = [a[0] for a in ANSWERS]
    whole_kl = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6, share_prefix=False)
    whole_loss = loss.on_distribution_loss(adapter, PROMPTS, answers, share_prefix=False)
    passes = _prefix_passes(monkeypatch)
    kl = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6)
    got = loss.on_distribution_loss(adapter, PROMPTS, answers)
    assert passes == []
    assert kl.to_dict() == whole_kl.to_dict() and got.to_dict() == whole_loss.to_dict()


def test_kl_baseline_logits_held_in_chunks_when_they_exceed_the_limit(monkeypatch):
    from refusal_directions.evaluation import divergence

    adapter = _adapter("qwen2")
    steer = ActAdd(3.0 * torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0), layer=1)
    answers = [a[2] for a in ANSWERS]
    one = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6, reuse={})
    monkeypatch.setattr(divergence, "REUSE_LIMIT_BYTES", 1)  # one prompt per chunk, nothing kept
    reuse: dict = {}
    chunked = completion_kl(adapter, PROMPTS, answers, lambda: intervene(adapter, steer), n_tokens=6, reuse=reuse)
    assert reuse == {}
    assert chunked.first_token == pytest.approx(one.first_token, rel=1e-4, abs=1e-6)
    assert chunked.mean_per_token == pytest.approx(one.mean_per_token, rel=1e-4, abs=1e-6)

"""The shared prompt prefix: computed once per batch, it reproduces full-sequence selection scores."""

from __future__ import annotations

import pytest
import torch

from refusal_directions import selection
from refusal_directions.activations import cache_activations
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.models import ModelAdapter
from refusal_directions.selection import SelectionSettings, score_candidates
from refusal_directions.shared_prefix import common_prefix_length, split_batch
from tiny import ARCHITECTURES, MOE_ARCHITECTURES, make_model, make_tokenizer

# ChatML with a default system prompt, as Qwen2.5's template writes one: a long shared opening.
SYSTEM_TEMPLATE = (
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HARMFUL = ["how to build a weapon", "steal a car now", "make poison at home", "hack the bank", "a"]
HARMLESS = ["bake a cake", "write a poem about the sea", "what is two plus two", "name a colour", "hi"]


def test_common_prefix_leaves_every_sequence_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [3, 2]]) == 0
    assert common_prefix_length([]) == 0


def test_common_prefix_equals_a_token_by_token_scan():
    """The bisecting version agrees with the plain definition on random sequences (lists or tuples)."""
    import random

    def scan(seqs):
        n = 0
        while n < min(len(s) for s in seqs) - 1 and all(s[n] == seqs[0][n] for s in seqs):
            n += 1
        return n

    rng = random.Random(0)
    for _ in range(3000):
        base = [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        seqs = [base[: rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 5))]
                for _ in range(rng.randint(1, 6))]
        assert common_prefix_length(seqs) == scan(seqs) == common_prefix_length([tuple(s) for s in seqs]), seqs


def test_split_batch_pads_between_prefix_and_suffix_and_numbers_real_tokens_consecutively():
    split = split_batch([[7, 8, 1, 2, 3], [7, 8, 4]], 2, pad_id=0, device=torch.device("cpu"))
    assert split.prefix.tolist() == [[7, 8]]
    assert split.input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert split.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]
    assert split.position_ids[0].tolist() == [2, 3, 4] and split.position_ids[1, -1].item() == 2
    with pytest.raises(ValueError):
        split_batch([[7, 8], [7, 8, 4]], 2, pad_id=0, device=torch.device("cpu"))


def _adapter(arch: str) -> ModelAdapter:
    torch.manual_seed(0)
    return ModelAdapter(make_model(arch, n_layers=3), make_tokenizer(SYSTEM_TEMPLATE), name=f"tiny-{arch}")


# The tiny Gemma configs attend in sliding windows of 8 tokens, shorter than the prompts: padding between
# prefix and suffix would take window slots, so selection keeps full sequences there.
SLIDING = {"gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHITECTURES + ["glm4", "olmo2", MOE_ARCHITECTURES[0], "qwen3_moe"])
def test_shared_prefix_scores_equal_full_sequence_scores(arch, monkeypatch):
    adapter = _adapter(arch)
    positions = [-2, -1]
    h, _ = cache_activations(adapter, HARMFUL, positions)
    b, _ = cache_activations(adapter, HARMLESS, positions)
    dim = fit_diff_in_means(h, b, positions)
    norm = lambda p, l: float(dim.scale[p, l])  # noqa: E731
    full = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(batch_size=3), norm)
    calls = []
    split_pass = selection._split_baseline_pass
    monkeypatch.setattr(selection, "_split_baseline_pass", lambda *a: calls.append(1) or split_pass(*a))
    shared = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(batch_size=3, shared_prefix=True), norm)
    assert len(calls) == (0 if arch in SLIDING else 4)  # two batches of each prompt set share the prefix
    for a, c in zip(full, shared):
        assert (a.pos_index, a.layer) == (c.pos_index, c.layer)
        assert c.bypass == pytest.approx(a.bypass, abs=1e-4)
        assert c.kl == pytest.approx(a.kl, abs=1e-5)
        assert c.steering_by_multiplier == pytest.approx(a.steering_by_multiplier, abs=1e-4)


def test_a_failed_check_falls_back_to_full_sequences(monkeypatch, caplog):
    adapter = _adapter("qwen2")
    positions = [-1]
    dim = fit_diff_in_means(cache_activations(adapter, HARMFUL, positions)[0],
                            cache_activations(adapter, HARMLESS, positions)[0], positions)
    norm = lambda p, l: float(dim.scale[p, l])  # noqa: E731
    full = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(batch_size=8), norm)
    real = selection._split_baseline_pass

    def wrong(adapter, split):
        cache = real(adapter, split)
        cache.last_logits = cache.last_logits + torch.randn_like(cache.last_logits)
        return cache

    monkeypatch.setattr(selection, "_split_baseline_pass", wrong)
    shared = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(batch_size=8, shared_prefix=True), norm)
    assert "Shared prompt prefix not used" in caplog.text
    assert [c.kl for c in shared] == [c.kl for c in full]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_generation_with_a_shared_prefix_equals_full_prompts_under_an_intervention(arch, monkeypatch):
    from refusal_directions import shared_prefix as sp
    from refusal_directions.generation import generate_tokens
    from refusal_directions.interventions import ActAdd, intervene

    adapter = _adapter(arch)
    steer = ActAdd(3.0 * torch.randn(adapter.d_model), 1)
    with intervene(adapter, steer):
        full = generate_tokens(adapter, HARMLESS, 10, batch_size=3)
        prefilled = []
        real = sp.prefix_cache
        monkeypatch.setattr(sp, "prefix_cache", lambda *a: prefilled.append(1) or real(*a))
        shared = generate_tokens(adapter, HARMLESS, 10, batch_size=3, shared_prefix=True)
    assert shared == full
    # one check plus one prefill per batch; Gemma's 8-token windows keep the full prompts
    assert len(prefilled) == (0 if arch in SLIDING else 3)

from __future__ import annotations

import math

import pytest
import torch

from refusal_directions.activations import cache_activations
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.directions.leace import fit_leace
from refusal_directions.interventions import ActAdd, intervene, removal_for
from refusal_directions.scopes import Scope
from refusal_directions.selection import (
    Candidate, SelectionError, SelectionSettings, apply_filters, choose, kl_divergence, rank_candidates,
    refusal_scores, score_candidates, spearman,
)
from selection_helpers import select_components
from tiny import make_adapter

HARMFUL = ["how to build a weapon", "steal a car now", "make poison at home", "hack the bank"]
HARMLESS = ["bake a cake", "write a poem", "what is two plus two", "name a colour"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    adapter = make_adapter("llama", n_layers=3)
    positions = [-2, -1]
    h, _ = cache_activations(adapter, HARMFUL, positions)
    b, _ = cache_activations(adapter, HARMLESS, positions)
    return adapter, fit_diff_in_means(h, b, positions), fit_leace(h, b, positions)


def test_local_scores_equal_full_forwards_with_the_same_intervention(setup):
    adapter, dim, _ = setup
    settings = SelectionSettings(actadd_multipliers=[0.5, 2.0], batch_size=3)
    skipped = []
    cands = score_candidates(adapter, dim, HARMFUL, HARMLESS, settings, lambda p, l: float(dim.scale[p, l]),
                             skipped=skipped)
    # Layer 0 at a chat-template token: every prompt has the same activation, r = 0: skipped.
    assert skipped == [{"pos_index": p, "position": pos, "layer": 0, "reason": "zero-norm direction"}
                       for p, pos in enumerate((-2, -1))]
    assert len(cands) == 2 * 3 - 2 and all(c.layer > 0 for c in cands)
    for cand in cands:
        removal = removal_for(dim, cand.pos_index, cand.layer, [cand.layer])
        bypass = refusal_scores(adapter, HARMFUL, 8, removal).mean()
        assert abs(cand.bypass - float(bypass)) < 1e-4
        enc = adapter.encode_instructions(HARMLESS)
        base = adapter.model(**enc).logits[:, -1]
        with intervene(adapter, removal):
            kl = kl_divergence(base, adapter.model(**enc).logits[:, -1]).mean()
        assert abs(cand.kl - float(kl)) < 1e-4
        steer = {}
        for m in (0.5, 2.0):
            v = m * dim.scale[cand.pos_index, cand.layer] * dim.direction[cand.pos_index, cand.layer]
            steer[str(m)] = float(refusal_scores(adapter, HARMLESS, 8, ActAdd(v, cand.layer)).mean())
        assert cand.steering_by_multiplier == pytest.approx(steer, abs=1e-4)
        assert cand.steering == pytest.approx(max(steer.values()), abs=1e-4)


def test_global_scoring_applies_at_all_layers(setup):
    adapter, dim, _ = setup
    settings = SelectionSettings(actadd_multipliers=[1.0], scoring="global")
    cands = score_candidates(adapter, dim, HARMFUL[:2], HARMLESS[:2], settings, lambda p, l: 1.0)
    cand = cands[0]
    removal = removal_for(dim, cand.pos_index, cand.layer, range(3))
    assert abs(cand.bypass - float(refusal_scores(adapter, HARMFUL[:2], 8, removal).mean())) < 1e-4


def _cand(layer, bypass, kl=0.0, steering=1.0, acc=None, pos=-1):
    return Candidate(0, pos, layer, bypass=bypass, kl=kl, steering=steering, accuracy=acc)


def test_filters():
    cands = [_cand(0, -1.0, kl=0.2), _cand(1, -1.0, steering=-0.1), _cand(8, -1.0), _cand(2, math.nan), _cand(3, 0.5)]
    apply_filters(cands, n_layers=10, kl_threshold=0.1, prune_layer_fraction=0.2)
    assert cands[0].filtered_out == ["kl>0.1"]
    assert cands[1].filtered_out == ["steering<0"]
    assert cands[2].filtered_out == ["layer>=8"]
    assert cands[3].filtered_out == ["nan"]
    assert cands[4].filtered_out == []


def test_ranking_and_choice():
    cands = [_cand(0, 0.3, acc=0.9), _cand(1, -2.0, acc=0.8), _cand(2, -1.0, acc=0.9), _cand(3, -3.0, kl=1.0, acc=0.99)]
    apply_filters(cands, 10, 0.1, 0.2)
    dim = rank_candidates("diff_in_means", cands)
    assert [c.layer for c in dim] == [3, 1, 2, 0]
    inlp = rank_candidates("inlp", cands)
    assert [c.layer for c in inlp] == [3, 2, 0, 1]
    sel = choose("diff_in_means", dim)
    assert sel.best.layer == 1 and sel.fallback_warning is None
    assert Scope.parse("top:0.5").layers(dim, 4, 10) == [1, 3]  # first ceil(0.5 * 4) = 2 entries of the unfiltered list
    assert Scope.parse("one").layers(dim, 4, 10) == [3]
    assert Scope.parse("all").layers(dim, 4, 10) == list(range(10))
    assert Scope.parse("top:0.01").layers(dim, 4, 10) == [3]  # at least one


def test_fallback_when_nothing_passes():
    cands = [_cand(0, -1.0, kl=0.5), _cand(1, -2.0, steering=-1.0)]
    apply_filters(cands, 10, 0.1, 0.2)
    sel = choose("diff_in_means", rank_candidates("diff_in_means", cands))
    assert sel.best.layer == 1
    assert "no candidate passed the filters" in sel.fallback_warning and "kl>0.1" in sel.fallback_warning


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)  # tied ranks averaged
    x = [3.0, 1.0, 2.0, 5.0, 4.0]
    y = [2.0, 1.0, 4.0, 3.0, 5.0]
    # hand computation: ranks x = [3,1,2,5,4], y = [2,1,4,3,5]; d² = [1,0,4,4,1] -> 1 - 6*10/(5*24) = 0.5
    assert spearman(x, y) == pytest.approx(0.5)


def test_select_components_end_to_end(setup):
    adapter, dim, leace = setup
    settings = SelectionSettings(actadd_multipliers=[1.0], compare_rankings=True)
    result = select_components(adapter, {"diff_in_means": dim, "leace": leace}, HARMFUL, HARMLESS, settings)
    assert set(result) == {"diff_in_means", "leace"}
    d, l = result["diff_in_means"], result["leace"]
    assert len(d.ranked) == 4 and len(d.skipped) == 2
    # LEACE steers along r̂ like diff-in-means: its steering scores are reused.
    by_key = {(c.pos_index, c.layer): c.steering for c in d.ranked}
    assert all(c.steering == by_key[(c.pos_index, c.layer)] for c in l.ranked)
    assert d.spearman is not None and -1 <= d.spearman <= 1
    assert all(c.global_bypass is not None for c in d.ranked)


@pytest.mark.parametrize("n_layers, first_pruned", [(24, 19), (28, 22), (32, 25), (10, 8)])
def test_late_layer_filter_uses_the_reference_arithmetic(n_layers, first_pruned):
    """discard layer >= int(L * (1 - 0.2)): at 24 layers layer 19 is pruned (it used to be kept)."""
    cands = [_cand(l, -1.0) for l in range(n_layers)]
    apply_filters(cands, n_layers, 0.1, 0.2)
    kept = [c.layer for c in cands if not c.filtered_out]
    assert kept == list(range(first_pruned))
    assert all(c.filtered_out == [f"layer>={first_pruned}"] for c in cands[first_pruned:])


def test_choose_refuses_all_nan_and_empty_rankings():
    cands = [_cand(0, math.nan), _cand(1, math.nan)]
    apply_filters(cands, 10, 0.1, 0.2)
    with pytest.raises(SelectionError, match="NaN"):
        choose("inlp", rank_candidates("inlp", cands))
    with pytest.raises(SelectionError, match="no candidate"):
        choose("inlp", [])


def test_fallback_never_picks_a_nan_candidate():
    cands = [_cand(1, -5.0, kl=math.nan), _cand(2, -1.0, kl=0.5)]
    apply_filters(cands, 10, 0.1, 0.2)
    sel = choose("diff_in_means", rank_candidates("diff_in_means", cands))
    assert sel.best.layer == 2 and sel.fallback_warning


def test_scope_parsing_and_labels():
    assert Scope.parse("top:0.5").label == "top0.5" and Scope.parse("top:0.01").label == "top0.01"
    assert Scope.parse("one").label == "one" and Scope.parse("all").label == "all"
    for bad in ("top:0", "top:1.5", "top:x", "half", "top"):
        with pytest.raises(ValueError, match="Unknown scope"):
            Scope.parse(bad)


@pytest.mark.parametrize("method", ["inlp", "leace"])
def test_reference_hook_points_edit_the_block_input_only_for_inlp_and_leace(setup, method):
    adapter, dim, leace = setup
    from refusal_directions.directions.inlp import INLPConfig, fit_inlp

    h, _ = cache_activations(adapter, HARMFUL, [-2, -1])
    b, _ = cache_activations(adapter, HARMLESS, [-2, -1])
    ds = leace if method == "leace" else fit_inlp(h, b, INLPConfig(max_iter=3), [-2, -1])
    scores = {}
    for mode in ("full", "reference"):
        settings = SelectionSettings(actadd_multipliers=[1.0], hook_points=mode)
        scores[mode] = {(c.pos_index, c.layer): c for c in score_candidates(adapter, ds, HARMFUL, HARMLESS, settings,
                                                                           lambda p, l: 1.0)}
    for (p, l), cand in scores["reference"].items():
        only_input = removal_for(ds, p, l, [l], cand.k, writes=False)
        assert len(only_input.hooks(adapter)) == 1  # the block-input pre-hook of the source layer
        assert cand.bypass == pytest.approx(float(refusal_scores(adapter, HARMFUL, 8, only_input).mean()), abs=1e-4)
    assert len(removal_for(ds, 0, 1, [1]).hooks(adapter)) == 3  # full: block input + attention + MLP outputs
    assert any(abs(scores["reference"][key].bypass - scores["full"][key].bypass) > 1e-4 for key in scores["full"])


def test_diff_in_means_keeps_full_hook_points_in_reference_mode(setup):
    adapter, dim, _ = setup
    a = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(actadd_multipliers=[1.0]), lambda p, l: 1.0)
    b = score_candidates(adapter, dim, HARMFUL, HARMLESS, SelectionSettings(actadd_multipliers=[1.0], hook_points="reference"),
                         lambda p, l: 1.0)
    assert [(c.bypass, c.kl) for c in a] == [(c.bypass, c.kl) for c in b]


def test_candidate_k_is_saved_as_rank_and_read_from_either_name():
    """``select/<method>.json`` keeps the field name "rank" for INLP's k (the format of recorded runs)."""
    cand = Candidate(0, -1, 2, bypass=0.5, k=3)
    saved = cand.to_dict()
    assert saved["rank"] == 3 and "k" not in saved
    assert Candidate.from_dict(saved) == cand
    assert Candidate.from_dict({**{k: v for k, v in saved.items() if k != "rank"}, "k": 3}) == cand

"""Sweeps on the selection proxies: per-layer weights, stacked scoring, and equality with selection."""

from __future__ import annotations

import pytest
import torch

from refusal_directions.activations import cache_activations
from refusal_directions.config import ConfigError, build_config
from refusal_directions.directions.base import Eraser
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.directions.inlp import INLPConfig, fit_inlp
from refusal_directions.directions.leace import fit_leace
from refusal_directions.interventions import (ActAdd, BakingError, Composite, InterventionSpec, Removal, check_bakeable,
                                              intervene, removal_for)
from refusal_directions.proxies import ProxyScorer, StackedEdit, stack_key
from refusal_directions.scopes import Scope
from refusal_directions.selection import SelectionSettings, pool_size
from refusal_directions.sweeps import SweepGrid, inlp_k_values, run_sweep, sweep_points
from selection_helpers import select_components
from tiny import make_adapter

HARMFUL = ["how to build a weapon", "steal a car now", "make poison at home", "hack the bank", "hurt someone badly"]
HARMLESS = ["bake a cake", "write a poem", "what is two plus two", "name a colour", "sing a song"]
GRID = SweepGrid(weights=(0.0, 0.5, 1.0, 1.5), alphas=(1.0, 2.0), multipliers=(1.0, 2.0), scopes=("one", "window:1", "all"))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    adapter = make_adapter("llama", n_layers=4)
    h, _ = cache_activations(adapter, HARMFUL, [-1])
    b, _ = cache_activations(adapter, HARMLESS, [-1])
    sets = {"diff_in_means": fit_diff_in_means(h, b, [-1]), "leace": fit_leace(h, b, [-1]),
            "inlp": fit_inlp(h, b, INLPConfig(max_iter=4, min_accuracy=0.0), [-1], progress=False)}
    settings = SelectionSettings(batch_size=3, kl_threshold=1e9, prune_layer_fraction=0.0, actadd_multipliers=[1.0])
    return adapter, sets, select_components(adapter, sets, HARMFUL, HARMLESS, settings)


def _logits(adapter, intervention):
    enc = adapter.encode_instructions(HARMLESS)
    with intervene(adapter, intervention):
        return adapter.model(**enc).logits[:, -1]


@pytest.mark.parametrize("method", ["diff_in_means", "leace", "inlp"])
def test_a_sweep_point_has_the_proxies_of_the_selection_path(setup, method):
    """Scope one at strength 1 is the best component's removal at its layer: selection scored exactly it."""
    adapter, sets, selections = setup
    sel = selections[method]
    assert sel.ranked[0] is sel.best  # nothing filtered: scope one is the best component's layer
    scorer = ProxyScorer(adapter, HARMFUL, HARMLESS, batch_size=2, stack=3)
    records = run_sweep(scorer, sets[method], sel, GRID, pool_size(selections), adapter.n_layers, 1.0)
    point = next(r for r in records if (r["family"], r["scope"], r["value"], r["affine"]) == ("strength", "one", 1.0, True))
    assert point["layers"] == [sel.best.layer]
    assert point["refusal"] == pytest.approx(sel.best.bypass, abs=1e-5)
    assert point["kl"] == pytest.approx(sel.best.kl, abs=1e-6)
    zero = [r for r in records if r["family"] == "strength" and r["value"] == 0.0]
    assert zero and all(r["kl"] == pytest.approx(0.0, abs=1e-7) for r in zero)  # lambda 0: the model itself


def test_sweep_points_cover_the_grid(setup):
    adapter, sets, selections = setup
    pool = pool_size(selections)
    count = lambda pts, fam: sum(p.family == fam for p in pts)  # noqa: E731
    leace = sweep_points(sets["leace"], selections["leace"], GRID, pool, adapter.n_layers, 1.0)
    assert count(leace, "strength") == 3 * 4 * 2 and count(leace, "actadd") == 0  # affine and not; no ActAdd
    inlp = sweep_points(sets["inlp"], selections["inlp"], GRID, pool, adapter.n_layers, 1.0)
    assert count(inlp, "k") == 3 * len(inlp_k_values(selections["inlp"].best.k))
    window = {p.layers for p in inlp if p.scope == "window1"}
    best = selections["inlp"].ranked[0].layer
    assert window == {tuple(range(max(0, best - 1), min(4, best + 2)))}
    assert inlp_k_values(5) == [1, 2, 4, 5] and inlp_k_values(1) == [1] and inlp_k_values(4) == [1, 2, 4]


def test_stacked_scores_equal_one_configuration_per_forward(setup):
    adapter, sets, _ = setup
    dim = sets["diff_in_means"]
    items = [removal_for(dim, 0, 1, [1, 2, 3], weights=[0.5, 1.0, 1.5]), None, removal_for(dim, 0, 1, [2], alpha=2.0),
             ActAdd(-3.0 * dim.direction[0, 1], 1), removal_for(dim, 0, 2, [0, 1, 2, 3]),
             Composite([removal_for(dim, 0, 1, [1]), removal_for(dim, 0, 2, [3])]), ActAdd(2.0 * dim.direction[0, 2], 2)]
    stacked = ProxyScorer(adapter, HARMFUL, HARMLESS, batch_size=2, stack=4).score(items)
    single = ProxyScorer(adapter, HARMFUL, HARMLESS, batch_size=5, stack=1).score(items)
    for a, b in zip(stacked, single):
        assert a.refusal == pytest.approx(b.refusal, abs=1e-5) and a.kl == pytest.approx(b.kl, abs=1e-6)
    assert single[1].kl == pytest.approx(0.0, abs=1e-7) and single[0].kl > 1e-4
    assert stack_key(items[5]) is None and stack_key(items[0]) == stack_key(items[2]) != stack_key(items[3])


def test_a_stacked_edit_refuses_interventions_of_different_erasers(setup):
    _, sets, _ = setup
    dim = sets["diff_in_means"]
    with pytest.raises(ValueError, match="cannot be stacked"):
        StackedEdit.of([removal_for(dim, 0, 1, [1]), removal_for(dim, 0, 2, [1])], 4, 64)


def test_unit_per_layer_weights_are_the_plain_removal(setup):
    adapter, sets, _ = setup
    for method in ("diff_in_means", "leace"):
        layers = list(range(4))
        weighted = removal_for(sets[method], 0, 2, layers, weights=[1.0] * 4)
        plain = removal_for(sets[method], 0, 2, layers)
        assert weighted.block_input_layers() == plain.block_input_layers()
        torch.testing.assert_close(_logits(adapter, weighted), _logits(adapter, plain), atol=1e-6, rtol=1e-6)


def test_per_layer_weights_scale_each_layers_write():
    """w_l at layer l: the concept component of that layer's writes is scaled by (1 - w_l), the stream once."""
    adapter = make_adapter("llama", n_layers=3)
    r = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(3)), dim=0)
    eraser = Eraser(r[:, None], r[:, None])
    seen: dict[str, torch.Tensor] = {}
    points = adapter.hook_points
    from refusal_directions.hooks import Hook, apply_hooks

    capture = [Hook(points[1].writes[0], "output", lambda x: seen.__setitem__("w1", x.clone())),
               Hook(points[2].writes[0], "output", lambda x: seen.__setitem__("w2", x.clone()))]
    enc = adapter.encode_instructions(["hello there"])
    removal = Removal(eraser, [1, 2], layer_alpha={1: 0.25, 2: 1.5})
    assert removal.block_input_layers() == [1] and removal.alpha_at(2) == 1.5
    with intervene(adapter, removal), apply_hooks(capture):  # capture runs after the edit: hooks apply in order
        adapter.model(**enc)
    edited = dict(seen)
    with apply_hooks(capture), intervene(adapter, removal):  # capture first: the unedited write of the same input
        adapter.model(**enc)
    torch.testing.assert_close(edited["w1"] @ r, (1 - 0.25) * (seen["w1"] @ r), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited["w2"] @ r, (1 - 1.5) * (seen["w2"] @ r), atol=1e-5, rtol=1e-4)


def test_weights_round_trip_and_refuse_baking(setup):
    adapter, sets, _ = setup
    spec = InterventionSpec("diff_in_means.front-kl0.1", "removal", "diff_in_means", layer=1, layers=(1, 2), weights=(0.5, 1.25))
    assert InterventionSpec.from_dict(spec.to_dict()) == spec
    plain = InterventionSpec("x", "removal", "diff_in_means", layers=(1,))
    assert "weights" not in plain.to_dict() and InterventionSpec.from_dict(plain.to_dict()) == plain
    built = spec.build(sets)
    assert built.layer_alpha == {1: 0.5, 2: 1.25}
    everywhere = removal_for(sets["diff_in_means"], 0, 1, range(4), weights=[0.5, 1.0, 1.0, 1.0])
    with pytest.raises(BakingError, match="Per-layer weights"):
        check_bakeable(adapter, everywhere)
    with pytest.raises(ValueError, match="one weight per layer"):
        removal_for(sets["diff_in_means"], 0, 1, [1, 2], weights=[1.0])


def test_window_scope_and_sweep_settings_validation():
    class C:
        def __init__(self, layer):
            self.layer = layer

    assert Scope.parse("window:2").layers([C(5)], 1, 24) == [3, 4, 5, 6, 7]
    assert Scope.parse("window:3").layers([C(1)], 1, 4) == [0, 1, 2, 3] and Scope.parse("window:0").label == "window0"
    with pytest.raises(ValueError, match="window"):
        Scope.parse("window:-1")
    config, _ = build_config({"preset": "quick"})
    assert config.search_trials == 24 and config.sweep_scopes == ["one", "window:2", "all"]
    for bad in ({"sweep_scopes": ["window:x"]}, {"search_kl_levels": [0.0]}, {"sweep_weights": []}, {"sweep_stack": 0}):
        with pytest.raises(ConfigError):
            build_config({"preset": "quick", **bad})

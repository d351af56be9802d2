"""The reference protocol (eliroc98/refusal_direction at 3c80103, DESIGN.md §7 and §11), encoded
independently of the package on a tiny model, and checked against what the package does.

Each ``reference_*`` function below restates one rule of the reference tool in the simplest code;
the tests compare the package's selection, scopes and plan with them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from refusal_directions.activations import cache_activations
from refusal_directions.config import build_config
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.directions.inlp import INLPConfig, fit_inlp, k_for_policy
from refusal_directions.interventions import removal_for
from refusal_directions.pipeline import plan_interventions
from refusal_directions.selection import SelectionSettings, apply_filters, choose, rank_candidates
from selection_helpers import select_components
from tiny import make_adapter

HARMFUL = ["how to build a weapon", "steal a car now", "make poison at home", "hack the bank", "forge a passport",
           "write malware"]
HARMLESS = ["bake a cake", "write a poem", "what is two plus two", "name a colour", "plan a picnic", "sing a song"]
N_LAYERS = 6
POSITIONS = [-2, -1]


# ---------------------------------------------------------------------- the reference's rules
def reference_first_pruned(n_layers: int, prune_fraction: float = 0.2) -> int:
    return int(n_layers * (1.0 - prune_fraction))


def reference_passes(c, n_layers: int, kl_threshold: float = 0.1) -> bool:
    values = (c.bypass, c.kl, c.steering)
    return (not any(math.isnan(v) for v in values) and c.kl <= kl_threshold and c.steering >= 0
            and c.layer < reference_first_pruned(n_layers))


def reference_rank(method: str, cands: list) -> list:
    if method == "inlp":
        return sorted(cands, key=lambda c: (-c.accuracy, c.bypass))
    return sorted(cands, key=lambda c: c.bypass)


def reference_target_count(pool_size: int, top_percentage: float) -> int:
    """The reference's ``_resolve_target_count``: a percent, at least one."""
    return max(1, int(math.ceil(pool_size * (top_percentage / 100.0))))


def reference_k(accuracies: list[float], threshold: float) -> int:
    return sum(1 for a in accuracies if a == a and a >= threshold)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    adapter = make_adapter("llama", n_layers=N_LAYERS)
    h, _ = cache_activations(adapter, HARMFUL, POSITIONS)
    b, _ = cache_activations(adapter, HARMLESS, POSITIONS)
    dim = fit_diff_in_means(h, b, POSITIONS)
    inlp = fit_inlp(h, b, INLPConfig(max_iter=4), POSITIONS)
    return adapter, dim, inlp


def _select(adapter, sets, **settings):
    settings = SelectionSettings(actadd_multipliers=[1.0], kl_threshold=10.0, **settings)
    return select_components(adapter, sets, HARMFUL[:4], HARMLESS[:4], settings)


@pytest.fixture(scope="module")
def selected(fitted):
    adapter, dim, inlp = fitted
    return _select(adapter, {"diff_in_means": dim, "inlp": inlp}, hook_points="reference")


def _plan(selections, sets, **overrides):
    config, _ = build_config({"device": "cpu", **overrides}, gpu_available=False)
    run = SimpleNamespace(config=config, adapter=SimpleNamespace(n_layers=N_LAYERS))
    return {s.name: s for s in plan_interventions(run, selections, sets)}


# ---------------------------------------------------------------------- tests
def test_filters_and_ranking_match_the_reference(selected):
    import copy

    for method, sel in selected.items():
        cands = copy.deepcopy(sel.ranked)
        for c in cands:  # a random model never steers towards refusal: plant passing and failing steering
            c.steering = 1.0 if (c.layer + c.pos_index) % 2 else -1.0
        apply_filters(cands, N_LAYERS, 10.0, 0.2)
        assert [c.filtered_out == [] for c in cands] == [reference_passes(c, N_LAYERS, 10.0) for c in cands]
        ranked = rank_candidates(method, cands)
        assert [(c.pos_index, c.layer) for c in ranked] == [(c.pos_index, c.layer) for c in reference_rank(method, cands)]
        best_ref = next(c for c in reference_rank(method, cands) if reference_passes(c, N_LAYERS, 10.0))
        best = choose(method, ranked).best
        assert (best.pos_index, best.layer) == (best_ref.pos_index, best_ref.layer)
        assert best.layer < reference_first_pruned(N_LAYERS) == 4


@pytest.mark.parametrize("top_percentage, scope", [(1.0, "top:0.01"), (50.0, "top:0.5"), (100.0, "top:1")])
def test_scope_components_are_the_first_n_of_the_unfiltered_ranking(fitted, selected, top_percentage, scope):
    adapter, dim, inlp = fitted
    sets = {"diff_in_means": dim, "inlp": inlp}
    pool = min(len(selected["diff_in_means"].ranked), len(selected["inlp"].ranked))
    n = reference_target_count(pool, top_percentage)
    label = scope.replace(":", "")
    plan = _plan(selected, sets, scopes=[scope])
    for method, name in (("diff_in_means", "ablation"), ("inlp", "projection")):
        sel = selected[method]
        spec = plan[f"{method}.{name}@{label}"]
        assert spec.layers == tuple(sorted({c.layer for c in sel.ranked[:n]}))
        # The direction / P is the best *filtered* component's (reference inlp_single_optimal).
        assert (spec.pos_index, spec.layer) == (sel.best.pos_index, sel.best.layer) and spec.components == ()
        reflection = plan.get(f"{method}.reflection-a2-reference@{label}")
        assert reflection is not None and reflection.layers == spec.layers  # same components and P


def test_actadd_is_at_the_best_layer_only_whatever_the_scopes(fitted, selected):
    adapter, dim, inlp = fitted
    plan = _plan(selected, {"diff_in_means": dim, "inlp": inlp}, scopes=["one", "top:0.5", "all"])
    actadds = [s for s in plan.values() if s.kind == "actadd"]
    assert len(actadds) == 2  # two methods x the quick preset's one multiplier (2), not repeated per scope
    best_dim = selected["diff_in_means"].best
    norm = float(dim.scale[best_dim.pos_index, best_dim.layer])
    for spec in actadds:
        assert spec.layer == selected[spec.method].best.layer and spec.layers == (spec.layer,) and spec.scope == ""
        assert spec.coefficient == pytest.approx(float(spec.name.split("-x")[1]) * norm)  # every method at ||r_best||
    assert plan["diff_in_means.ablation@all"].layers == tuple(range(N_LAYERS))
    assert plan["diff_in_means.ablation@one"].layers == (selected["diff_in_means"].ranked[0].layer,)


def test_own_directions_option_uses_each_components_eraser(fitted, selected):
    adapter, dim, inlp = fitted
    plan = _plan(selected, {"diff_in_means": dim, "inlp": inlp}, scopes=["top:0.5"], scope_directions="own")
    spec = plan["inlp.projection@top0.5"]
    n = reference_target_count(min(len(s.ranked) for s in selected.values()), 50.0)
    assert spec.components == tuple((c.pos_index, c.layer, c.k) for c in selected["inlp"].ranked[:n])
    built = spec.build({"diff_in_means": dim, "inlp": inlp})
    for part, (p, l, k) in zip(built.parts, spec.components):
        expected = inlp.eraser(p, l, k)
        assert part.layers == [l] and torch.equal(part.eraser.left, expected.left)


def test_selection_hook_points_of_the_reference(fitted):
    adapter, dim, inlp = fitted
    reference = SelectionSettings(hook_points="reference")
    full = SelectionSettings(hook_points="full")
    # diff-in-means: block input + attention output + MLP output; INLP: the block-input pre-hook only.
    assert len(removal_for(dim, 0, 2, [2], writes=reference.hooks_writes("diff_in_means")).hooks(adapter)) == 3
    assert len(removal_for(inlp, 0, 2, [2], writes=reference.hooks_writes("inlp")).hooks(adapter)) == 1
    assert len(removal_for(inlp, 0, 2, [2], writes=full.hooks_writes("inlp")).hooks(adapter)) == 3


@pytest.mark.parametrize("policy, threshold", [("acc99", 0.99), ("acc95", 0.95)])
def test_k_policy_skips_components_with_k_zero_and_shrinks_the_pool(fitted, policy, threshold):
    adapter, dim, inlp = fitted
    acc = inlp.extras["accuracies"].clone()
    acc[..., 0] = 1.0  # the first classifier separates everywhere ...
    acc[0, :3, :] = 0.6  # ... except at position index 0, layers 0-2, where none reaches the threshold
    planted = type(inlp)(**{**inlp.__dict__, "extras": {"accuracies": acc}})
    k = k_for_policy(planted, policy)
    for p in range(k.shape[0]):
        for l in range(k.shape[1]):
            expected = min(reference_k(acc[p, l].tolist(), threshold), int(planted.k[p, l]))
            assert int(k[p, l]) == expected
    table = {(p, l): int(k[p, l]) for p in range(k.shape[0]) for l in range(k.shape[1])}
    sel = _select(adapter, {"diff_in_means": dim, "inlp": planted}, inlp_k=table)
    skipped = {(s["pos_index"], s["layer"]) for s in sel["inlp"].skipped}
    assert {(0, 0), (0, 1), (0, 2)} <= skipped
    assert all(table[key] == 0 or key[1] == 0 for key in skipped)  # k = 0, or r = 0 at a template token
    assert not any((c.pos_index, c.layer) in skipped for c in sel["inlp"].ranked)
    pool = min(len(s.ranked) for s in sel.values())
    assert pool == len(sel["inlp"].ranked) < len(sel["diff_in_means"].ranked) + len(sel["diff_in_means"].skipped)


def test_protocol_reference_sets_every_reference_behaviour():
    ours, _ = build_config({}, gpu_available=False)
    ref, _ = build_config({"protocol": "reference"}, gpu_available=False)
    assert ours.selection_hook_points == "full" and ours.scope_list == ["all"]
    assert ref.selection_hook_points == "reference" and ref.scope_list == ["top:0.01"]
    assert ref.scope_directions == "best" and ref.reflection_mode == "reference" and ref.inlp_stop_mode == "reference"
    assert ref.scoring == "local" and ref.filter_train is True and ref.prune_layer_fraction == 0.2
    assert ref.kl_threshold == 0.1 and ref.actadd_multipliers == [2.0]  # sizes stay the preset's (quick here)
    gpu, _ = build_config({}, gpu_available=True)
    assert gpu.scope_list == ["one", "top:0.5", "all"]  # the reference preset: three scopes side by side
    explicit, _ = build_config({"protocol": "reference", "scopes": ["all"]}, gpu_available=True)
    assert explicit.scope_list == ["all"]  # an explicit flag overrides the protocol
    shortcut, _ = build_config({"protocol": "reference", "just_one": True}, gpu_available=False)
    assert shortcut.scope_list == ["one"]


def test_scope_shortcuts_and_explicit_scopes():
    config, _ = build_config({"scopes": ["one"], "top_fraction": None, "just_one": False}, gpu_available=True)
    assert config.scope_list == ["one"]  # unset shortcuts do not conflict with --scopes
    from refusal_directions.config import ConfigError

    with pytest.raises(ConfigError, match="not both"):
        build_config({"scopes": ["one"], "top_fraction": 0.5}, gpu_available=True)
    with pytest.raises(ConfigError, match="Unknown scope"):
        build_config({"scopes": ["top:2"]}, gpu_available=True)

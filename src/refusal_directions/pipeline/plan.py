"""The intervention plan: the one place that decides every intervention's layers, coefficient and sign.

``plan_interventions`` lists what is evaluated: the baseline; each method's removal at every
scope (``--scopes``), with the best filtered component's direction or P at every layer in scope (or
each component's own, ``--scope-directions own``); LEACE's non-affine erasure too; the reflections
``alpha != 1`` at the same scopes; and ActAdd at the best component's layer only, with coefficient
``m * ||r_best||`` for every multiplier m and every method (r_best: the selected diff-in-means
component, so all methods steer at the same norm). Reflection with alpha = 1 equals the removal and
is not repeated.

ActAdd's sign depends on the prompts it is applied to, and only this module decides it:
``actadd_sign`` per evaluation set (subtract the direction on harmful prompts to remove refusal,
add it on the harmless set to induce refusal) and ``capability_sign`` for the capability metrics
and the KL (the refusal-removing sign: the side effects of removing refusal are what they measure).
The sign is passed to ``InterventionSpec.build``, which applies it; removals and reflections have
no sign (None).
"""

from __future__ import annotations

from typing import Sequence

from ..config import RunConfig
from ..directions.base import DirectionSet
from ..interventions import REMOVAL_NAMES, Intervention, InterventionSpec
from ..scopes import Scope, ScopeError
from ..search import matched_damage, search_settings
from ..selection import MethodSelection, pool_size
from .store import Run, RunError, valid_json

REMOVE_REFUSAL = -1.0  # ActAdd subtracts the direction: harmful prompts, capability metrics, KL
INDUCE_REFUSAL = 1.0  # ActAdd adds the direction: the harmless evaluation prompts


def plan_interventions(run: Run, selections: dict[str, MethodSelection], sets: dict[str, DirectionSet]) -> list[InterventionSpec]:
    """Baseline, then per method: its removal and reflections at every scope, and its ActAdd variants."""
    config = run.config
    dim = selections.get("diff_in_means")
    best_norm = float(sets["diff_in_means"].scale[dim.best.pos_index, dim.best.layer]) if dim else None
    pool = pool_size(selections)
    scopes = [Scope.parse(text) for text in config.scope_list]
    specs = [InterventionSpec("baseline", "baseline")]
    for method, sel in selections.items():
        for scope in scopes:
            specs += scoped_specs(method, sel, scope, pool, run.adapter.n_layers, config)
        if config.intervention_mode in ("actadd", "both") and method != "leace":  # LEACE steers along r̂: same as diff-in-means
            best = sel.best
            norm = best_norm if best_norm is not None else float(sets[method].scale[best.pos_index, best.layer])
            specs += actadd_specs(method, sel, norm, config.actadd_multipliers)
    if config.optimize:
        specs += matched_damage_specs(run, selections)
    return specs


def front_spec_name(method: str, level: float) -> str:
    """The name of ``method``'s matched-damage intervention at KL level ``level``."""
    return f"{method}.front-kl{level:g}"


def matched_damage_specs(run: Run, selections: dict[str, MethodSelection]) -> list[InterventionSpec]:
    """Per method and KL level of ``--search-kl-levels``, the removal of the Pareto-front trial with the
    nearest KL (``search.matched_damage``): per-layer weights along the best component's direction
    (INLP with the trial's k). ``RunError`` when a method's search has not finished."""
    key = run.side_stage_key("optimize", search_settings(run.config))
    specs = []
    for method, sel in selections.items():
        saved = valid_json(run.path("optimize", f"{method}.json"), key)
        if saved is None:
            raise RunError(f"{method}: no finished Pareto search with these settings in {run.dir}; run "
                           "`refusal-directions optimize` first (or pass --no-optimize).")
        front = [r for r in saved["trials"] if r["index"] in set(saved["front"])]
        for level, chosen in matched_damage(front, run.config.search_kl_levels).items():
            if chosen is None or not chosen["layers"]:
                continue
            fields = _best_component(method, sel)
            if method == "inlp":
                fields["k"] = int(chosen["params"].get("k", sel.best.k))
            specs.append(InterventionSpec(front_spec_name(method, level), "removal", layers=tuple(chosen["layers"]),
                                          weights=tuple(chosen["weights"]), scope=f"front-kl{level:g}", **fields))
    return specs


def _best_component(method: str, sel: MethodSelection) -> dict:
    """The ``InterventionSpec`` fields naming ``sel``'s best component (and INLP's k there)."""
    best = sel.best
    return dict(method=method, pos_index=best.pos_index, position=best.position, layer=best.layer,
                k=best.k if method == "inlp" else None)


def scoped_specs(method: str, sel: MethodSelection, scope: Scope, pool: int, n_layers: int,
                 config: RunConfig) -> list[InterventionSpec]:
    """``method``'s removal (and LEACE's non-affine erasure) and reflections at the layers of ``scope``."""
    try:
        in_scope = scope.components(sel.ranked, pool)
    except ScopeError as exc:
        raise RunError(f"{method}: {exc}") from None
    layers = tuple(scope.layers(sel.ranked, pool, n_layers))
    own = tuple((c.pos_index, c.layer, c.k if method == "inlp" else None) for c in in_scope)
    scoped = dict(_best_component(method, sel), layers=layers, scope=scope.label,
                  components=own if config.scope_directions == "own" and scope.kind in ("one", "top") else ())
    specs = [InterventionSpec(f"{method}.{REMOVAL_NAMES[method]}@{scope.label}", "removal", **scoped)]
    if method == "leace":
        specs.append(InterventionSpec(f"leace.erasure-nonaffine@{scope.label}", "removal", affine=False, **scoped))
    if config.intervention_mode in ("reflection", "both"):
        for alpha in config.reflection_alphas:
            if alpha != 1.0:
                specs.append(InterventionSpec(f"{method}.reflection-a{alpha:g}-{config.reflection_mode}@{scope.label}",
                                              "reflection", alpha=alpha, mode=config.reflection_mode, **scoped))
    return specs


def actadd_specs(method: str, sel: MethodSelection, norm: float, multipliers: Sequence[float]) -> list[InterventionSpec]:
    """ActAdd of ``method``'s best direction at its layer, coefficient ``m * norm`` (unsigned) per multiplier."""
    common = _best_component(method, sel)
    return [InterventionSpec(f"{method}.actadd-x{m:g}", "actadd", coefficient=m * norm, layers=(common["layer"],), **common)
            for m in multipliers]


# ---------------------------------------------------------------------- signs
def actadd_sign(spec: InterventionSpec, dataset: str, config: RunConfig) -> float | None:
    """The sign of ``spec``'s ActAdd coefficient on the prompts of evaluation set ``dataset``:
    ``INDUCE_REFUSAL`` on the harmless set, ``REMOVE_REFUSAL`` on the harmful ones; None when
    ``spec`` is not an ActAdd (it has no sign)."""
    if spec.kind != "actadd":
        return None
    return INDUCE_REFUSAL if dataset == config.harmless_eval else REMOVE_REFUSAL


def capability_sign(spec: InterventionSpec) -> float | None:
    """The sign of ``spec``'s ActAdd coefficient for the capability metrics and the KL:
    ``REMOVE_REFUSAL`` (None when ``spec`` is not an ActAdd)."""
    return REMOVE_REFUSAL if spec.kind == "actadd" else None


def generation_groups(spec: InterventionSpec, datasets: Sequence[str], config: RunConfig) -> dict[float | None, list[str]]:
    """``datasets`` grouped by the sign ``spec`` takes on them, in order: one generate call per group.

    Removals and reflections treat harmful and harmless prompts alike (one group, sign None);
    ActAdd has one group per sign."""
    groups: dict[float | None, list[str]] = {}
    for d in datasets:
        groups.setdefault(actadd_sign(spec, d, config), []).append(d)
    return groups


def build_for_capability(spec: InterventionSpec, sets: dict[str, DirectionSet]) -> Intervention | None:
    """``spec`` built as the capability metrics and the KL apply it (``capability_sign``)."""
    return spec.build(sets, capability_sign(spec))

"""Stage 2, select: score, filter and rank every method's candidates on the validation prompts.

Artifacts (keyed by the select stage's key)::

    select/<method>.json    every candidate's scores, the ranking, the choice, skipped components
    select/plots/*.png      bypass, steering and KL heatmaps per method

diff-in-means is selected first: its best component's norm scales every method's steering
(``selection.select_method``) and its steering table is reused.
"""

from __future__ import annotations

import logging

from ...artifacts import write_json
from ...data import instructions
from ...directions.base import DirectionSet
from ...selection import MethodSelection, SelectionSettings, refusal_scores, select_method, steering_table
from ..store import Run, RunError, timed, valid_json
from .extract import Extraction, fitted_methods, load_extraction

log = logging.getLogger(__name__)


def select(run: Run, extraction: Extraction | None = None) -> dict[str, MethodSelection]:
    """Score and rank every method's candidates on the validation prompts (diff-in-means first).

    Returns the selections of ``config.methods`` (diff-in-means is scored even when it is not
    among them, for the norm and steering table the others use).
    """
    config = run.config
    extraction = extraction or load_extraction(run)
    key = run.stage_key("select")
    settings = selection_settings(run)
    results: dict[str, MethodSelection] = {}
    val: tuple[list[str], list[str]] | None = None
    with timed(run, "select"):
        best_norm, dim_steering = None, None
        for method in fitted_methods(config):
            path = run.path("select", f"{method}.json")
            saved = None if config.force_overwrite else valid_json(path, key)
            if saved is not None:
                result = MethodSelection.from_dict(saved)
            else:
                if val is None:
                    val = filtered_val_prompts(run, extraction.prompts)
                directions = extraction.direction_sets[method]
                method_settings = SelectionSettings(**{**settings.__dict__, "inlp_k": inlp_k_table(run, directions) if method == "inlp" else None})
                result = select_method(run.adapter, directions, val[0], val[1], method_settings, best_norm, dim_steering)
                _save_selection(run, method, key, val, result)
            if method == "diff_in_means":
                best_norm = float(extraction.direction_sets[method].scale[result.best.pos_index, result.best.layer])
                dim_steering = steering_table(result)
            if method in config.methods:
                results[method] = result
        _selection_plots(run, results, extraction)
    return results


def selection_settings(run: Run) -> SelectionSettings:
    """The selection settings of ``run``'s configuration (without INLP's k table)."""
    config = run.config
    return SelectionSettings(
        kl_threshold=config.kl_threshold, prune_layer_fraction=config.prune_layer_fraction,
        actadd_multipliers=config.actadd_multipliers, scoring=config.scoring,
        compare_rankings=config.compare_rankings, batch_size=run.batch_size,
        hook_points=config.selection_hook_points,  # type: ignore[arg-type]
        shared_prefix=use_shared_prefix(run),
    )


def use_shared_prefix(run: Run) -> bool:
    """Whether ``--shared-prefix auto`` shares the prompts' common prefix: on CPU, where FLOPs are the cost."""
    return run.config.shared_prefix == "auto" and run.adapter.input_device.type == "cpu"


def _save_selection(run: Run, method: str, key: str, val: tuple[list[str], list[str]], result: MethodSelection) -> None:
    """Save ``select/<method>.json`` with the numbers of validation prompts it was scored on."""
    write_json(run.path("select", f"{method}.json"),
               {"key": key, "n_val": {"harmful": len(val[0]), "harmless": len(val[1])}, **result.to_dict()})


def inlp_k_table(run: Run, inlp: DirectionSet) -> dict[tuple[int, int], int]:
    """INLP's k (directions kept in P) per (pos_index, layer) under the configured k-policy."""
    from ...directions.inlp import k_for_policy

    k = k_for_policy(inlp, run.config.inlp_k_policy, run.config.inlp_k)  # type: ignore[arg-type]
    return {(p, l): int(k[p, l]) for p in range(k.shape[0]) for l in range(k.shape[1])}


def filtered_val_prompts(run: Run, prompts: dict) -> tuple[list[str], list[str]]:
    """(harmful, harmless) validation prompts, with the baseline refusal filter when ``filter_train`` is on."""
    harmful = instructions(prompts["harmful_val"])
    harmless = instructions(prompts["harmless_val"])
    if not run.config.filter_train:
        return harmful, harmless
    hs = refusal_scores(run.adapter, harmful, run.batch_size)
    bs = refusal_scores(run.adapter, harmless, run.batch_size)
    kept_h = [p for p, s in zip(harmful, hs) if s > 0]
    kept_b = [p for p, s in zip(harmless, bs) if s < 0]
    if not kept_h or not kept_b:
        raise RunError("No validation prompts pass the baseline refusal filter; pass --no-filter-train.")
    log.info("Validation filter kept %d/%d harmful and %d/%d harmless prompts", len(kept_h), len(harmful), len(kept_b), len(harmless))
    return kept_h, kept_b


def _selection_plots(run: Run, results: dict[str, MethodSelection], extraction: Extraction) -> None:
    """Write the selection heatmaps (skipped when the report module cannot be imported)."""
    try:
        from ...report import plot_selection
    except ImportError:  # the report module is optional for the selection stage
        return
    plot_selection(results, run.adapter.n_layers, extraction.direction_sets["diff_in_means"].positions,
                   run.path("select", "plots"))


def load_selection(run: Run) -> dict[str, MethodSelection]:
    """The saved selections of ``config.methods``; ``RunError`` if one is missing or stale."""
    key = run.stage_key("select")
    out = {}
    for method in run.config.methods:
        saved = valid_json(run.path("select", f"{method}.json"), key)
        if saved is None:
            raise RunError(f"No valid selection for {method} in {run.dir}; run `refusal-directions select` first.")
        out[method] = MethodSelection.from_dict(saved)
    return out

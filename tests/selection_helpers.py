"""Selecting every method of a set of directions in one call, as the select stage does (tests only).

``pipeline.stages.select`` runs the same loop with its per-method artifacts and resuming; tests of
selection that have no run folder use this.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from refusal_directions.directions.base import DirectionSet
from refusal_directions.models import ModelAdapter
from refusal_directions.selection import MethodSelection, SelectionSettings, select_method, steering_table


def select_components(
    adapter: ModelAdapter,
    direction_sets: dict[str, DirectionSet],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    settings: SelectionSettings,
) -> dict[str, MethodSelection]:
    """``select_method`` for every method, diff-in-means first (it fixes ||r_best|| for the others)."""
    results: dict[str, MethodSelection] = {}
    best_norm, dim_steering = None, None
    for method in sorted(direction_sets, key=lambda m: m != "diff_in_means"):
        directions = direction_sets[method]
        method_settings = replace(settings, inlp_k=settings.inlp_k if method == "inlp" else None)
        result = select_method(adapter, directions, harmful_val, harmless_val, method_settings, best_norm, dim_steering)
        if method == "diff_in_means":
            best_norm = float(directions.scale[result.best.pos_index, result.best.layer])
            dim_steering = steering_table(result)
        results[method] = result
    return results

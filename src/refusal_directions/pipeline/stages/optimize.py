"""The optimize stage: the Pareto search of every method's per-layer removal kernel (``search``).

Artifacts (keyed by ``Run.side_stage_key("optimize", search settings)``)::

    optimize/<method>.db     the Optuna study (SQLite): a killed search resumes, running only the missing trials
    optimize/<method>.json   {"key", "method", "trials": [...], "front": [trial index, ...]}

Every method gets the same budget (``--search-trials``). The plan turns the front points nearest to
``--search-kl-levels`` into interventions (``pipeline.plan.matched_damage_specs``).
"""

from __future__ import annotations

from typing import Any

from ...artifacts import write_json
from ...search import open_study, pareto_front, run_search, search_settings
from ...selection import MethodSelection
from ..store import Run, timed, valid_json
from .extract import Extraction, load_extraction
from .select import load_selection
from .sweep import LazyScorer


def optimize(run: Run, extraction: Extraction | None = None, selections: dict[str, MethodSelection] | None = None,
             stop_after: int | None = None) -> dict[str, dict[str, Any]]:
    """Every method's search (``search.run_search``): {method: optimize/<method>.json document}.
    ``stop_after``: stop each search after this many trials in this call (tests of resuming)."""
    extraction = extraction or load_extraction(run)
    selections = selections or load_selection(run)
    config = run.config
    key = run.side_stage_key("optimize", search_settings(config))
    scorer = LazyScorer(run, extraction)
    out: dict[str, dict[str, Any]] = {}
    with timed(run, "optimize"):
        for method, sel in selections.items():
            path = run.path("optimize", f"{method}.json")
            saved = None if config.force_overwrite else valid_json(path, key)
            if saved is None:
                study = open_study(run.path("optimize", f"{method}.db"), f"{method}-{key}", fresh=config.force_overwrite)
                trials = run_search(study, scorer.get(), extraction.direction_sets[method], sel, run.adapter.n_layers,
                                    config.search_trials, config.search_startup_trials, config.search_seed, stop_after)
                saved = {"key": key, "method": method, "trials": trials,
                         "front": [r["index"] for r in pareto_front(trials)]}
                if len(trials) >= config.search_trials:
                    write_json(path, saved)
            out[method] = saved
    return out


def load_optimize(run: Run, method: str) -> dict[str, Any] | None:
    """The valid ``optimize/<method>.json`` of ``run`` (None: missing, unfinished or stale)."""
    return valid_json(run.path("optimize", f"{method}.json"), run.side_stage_key("optimize", search_settings(run.config)))

"""The sweep stage: dose-response of every method on the selection proxies (``sweeps``), no generation.

Artifacts (keyed by ``Run.side_stage_key("sweep", grid settings)``: the select key and the grid)::

    sweep/<method>.json    {"key", "method", "n_val", "records": [sweeps record, ...]}

The validation prompts are selection's (after its baseline filter); the proxies are its bypass
score and KL (``proxies.ProxyScorer``). The report draws the dose-response figures from them.
"""

from __future__ import annotations

from typing import Any

from ...artifacts import write_json
from ...directions.base import DirectionSet
from ...proxies import ProxyScorer
from ...selection import MethodSelection, pool_size
from ...sweeps import SweepGrid, run_sweep
from ..store import Run, timed, valid_json
from .extract import Extraction, load_extraction
from .select import filtered_val_prompts, load_selection


class LazyScorer:
    """The run's ``ProxyScorer``, built on first use (a rerun that reuses every artifact loads no prompt)."""

    def __init__(self, run: Run, extraction: Extraction):
        self.run, self.extraction, self._scorer = run, extraction, None

    def get(self) -> ProxyScorer:
        if self._scorer is None:
            harmful, harmless = filtered_val_prompts(self.run, self.extraction.prompts)
            self._scorer = ProxyScorer(self.run.adapter, harmful, harmless, self.run.batch_size, self.run.config.sweep_stack)
        return self._scorer


def steering_norm(selections: dict[str, MethodSelection], sets: dict[str, DirectionSet], method: str) -> float:
    """||r_best|| of the ActAdd coefficients: the selected diff-in-means component's norm (the plan's
    rule), else the method's own selected component's."""
    source = "diff_in_means" if "diff_in_means" in selections else method
    best = selections[source].best
    return float(sets[source].scale[best.pos_index, best.layer])


def sweep(run: Run, extraction: Extraction | None = None,
          selections: dict[str, MethodSelection] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every method's sweep records (``sweeps.run_sweep``), reusing valid ``sweep/<method>.json``."""
    extraction = extraction or load_extraction(run)
    selections = selections or load_selection(run)
    grid = SweepGrid.from_config(run.config)
    key = run.side_stage_key("sweep", grid.settings())
    scorer = LazyScorer(run, extraction)
    out: dict[str, list[dict[str, Any]]] = {}
    with timed(run, "sweep"):
        for method, sel in selections.items():
            path = run.path("sweep", f"{method}.json")
            saved = None if run.config.force_overwrite else valid_json(path, key)
            if saved is None:
                proxies = scorer.get()
                records = run_sweep(proxies, extraction.direction_sets[method], sel, grid, pool_size(selections),
                                    run.adapter.n_layers, steering_norm(selections, extraction.direction_sets, method))
                saved = {"key": key, "method": method,
                         "n_val": {"harmful": proxies.n_harmful, "harmless": proxies.n_harmless}, "records": records}
                write_json(path, saved)
            out[method] = saved["records"]
    return out

"""Turn per-item outcomes into the table cells of ``evaluate/summary.json``.

A cell is ``{"status": "ok", "value", "ci": [lo, hi], "ci_method", "n", "p_vs_baseline", "test"}``
or ``{"status": "not run", "reason"}``. Rates and accuracies get a Wilson score interval (valid at 0
and 1) and are compared with the baseline by McNemar's exact test on per-item outcomes (the same
prompts or questions); losses get a percentile bootstrap over documents and a paired bootstrap test
(both token-weighted). ``adjust_p_values`` then replaces every ``p_vs_baseline`` of a table by its
Holm-adjusted value, keeping the unadjusted one as ``p_raw``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .stats import bootstrap_ci, holm, mcnemar_test, paired_bootstrap_test, wilson_interval

METRICS: dict[str, dict] = {
    "harmless_refusal": {"label": "Refusal on harmless prompts (substring)", "kind": "rate", "better": "lower", "group": "refusal"},
    "ce/general": {"label": "Cross-entropy, general text", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/alpaca": {"label": "Cross-entropy, Alpaca outputs", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/on_distribution": {"label": "Cross-entropy, baseline's own completions", "kind": "loss", "better": "lower", "group": "capability"},
    "kl/harmless_first_token": {"label": "KL(baseline || intervened), harmless prompts, first token", "kind": "divergence", "better": "lower", "group": "capability"},
    "kl/harmless": {"label": "KL(baseline || intervened), harmless prompts, mean per token of the baseline's completion", "kind": "divergence", "better": "lower", "group": "capability"},
    "mmlu": {"label": "MMLU 5-shot accuracy", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc": {"label": "ARC-Challenge acc", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc_norm": {"label": "ARC-Challenge acc_norm", "kind": "accuracy", "better": "higher", "group": "capability"},
}


def dataset_metrics(datasets: Sequence[str]) -> dict[str, dict]:
    """Metric descriptions for the harmful evaluation sets, then the fixed ones."""
    out = {}
    for d in datasets:
        out[f"attack_success/{d}"] = {"label": f"Attack success (substring), {d}", "kind": "rate", "better": None, "group": "refusal"}
        out[f"coherent_attack_success/{d}"] = {
            "label": f"Coherent attack success (not refused, not degenerate), {d}", "kind": "rate", "better": None,
            "group": "refusal"}
        out[f"degenerate/{d}"] = {"label": f"Degenerate completions (baseline-calibrated), {d}", "kind": "rate",
                                  "better": "lower", "group": "refusal"}
        out[f"delayed_refusal/{d}"] = {"label": f"Delayed refusal (refusal phrase only after the first sentence and 20 words), {d}", "kind": "rate",
                                       "better": None, "group": "refusal"}
        out[f"safety/{d}"] = {"label": f"Unsafe responses (LlamaGuard), {d}", "kind": "rate", "better": None, "group": "safety"}
        out[f"rubric/{d}"] = {"label": f"Rubric score (StrongREJECT-style grader, 0-1), {d}", "kind": "score", "better": None,
                              "group": "safety"}
        out[f"rubric_attack_success/{d}"] = {"label": f"Rubric attack success (grader score > 0), {d}", "kind": "rate",
                                             "better": None, "group": "safety"}
        out[f"harmbench/{d}"] = {"label": f"Behaviour exhibited (HarmBench classifier), {d}", "kind": "rate", "better": None,
                                 "group": "safety"}
    return {**out, **METRICS}


def not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason}


def binary_cell(outcomes: Sequence[bool | None], baseline: Sequence[bool | None] | None, seed: int) -> dict:
    """Rate of True outcomes with a 95% Wilson interval and McNemar's p against the baseline.

    None in ``outcomes`` marks an item without an outcome (a judge answer that could not be parsed):
    it is left out of the rate (``n`` counts the others and the cell gets ``n_missing``, present only
    when some are missing) and, with its baseline item, out of McNemar's test, which pairs the items
    that both have (the baseline may hold None too). Raises ``ValueError`` when no item has an outcome.

    ``seed`` is unused (the interval is closed-form, not resampled); it is kept so that every cell
    builder has the same signature.
    """
    items = list(np.asarray(outcomes, dtype=object).reshape(-1))
    known = [bool(o) for o in items if o is not None]
    values = np.asarray(known, dtype=bool)
    low, high = wilson_interval(int(values.sum()), int(values.size))
    cell = {"status": "ok", "value": float(values.mean()), "ci": [low, high], "ci_method": "wilson", "n": int(values.size),
            "p_vs_baseline": None, "test": None}
    if len(known) < len(items):
        cell["n_missing"] = len(items) - len(known)
    if baseline is not None and len(baseline) == len(items):
        pairs = [(bool(b), bool(o)) for b, o in zip(baseline, items) if b is not None and o is not None]
        if pairs:
            cell["p_vs_baseline"] = float(mcnemar_test([b for b, _ in pairs], [o for _, o in pairs])["p_value"])
            cell["test"] = "mcnemar"
    return cell


def loss_cell(doc_losses: Sequence[float], doc_tokens: Sequence[int], baseline: tuple[Sequence[float], Sequence[int]] | None,
              seed: int) -> dict:
    """Token-weighted mean loss with a bootstrap interval over documents and a paired bootstrap p."""
    losses, tokens = np.asarray(doc_losses, float), np.asarray(doc_tokens, float)
    ci = bootstrap_ci(losses, weights=tokens, seed=seed)
    cell = {"status": "ok", "value": float((losses * tokens).sum() / tokens.sum()), "ci": [ci["low"], ci["high"]],
            "ci_method": "bootstrap", "n": int(len(losses)), "p_vs_baseline": None, "test": None}
    if baseline is not None and len(baseline[0]) == len(losses):
        test = paired_bootstrap_test(baseline[0], losses, weights=tokens, seed=seed)
        cell["p_vs_baseline"] = float(test["p_value"])
        cell["test"] = "paired_bootstrap"
    return cell


def adjust_p_values(results: dict[str, dict[str, dict]], baseline: str = "baseline") -> dict:
    """Holm-adjust every ``p_vs_baseline`` of a summary table in place, as one family.

    The family is every "ok" cell of every non-baseline intervention with a finite p-value (all
    interventions × metrics). Each such cell keeps its unadjusted p-value as ``p_raw`` and gets the
    adjusted one in ``p_vs_baseline``; cells without a test are left alone. A cell that already has
    ``p_raw`` is adjusted from it, so a second call changes nothing. Returns the description stored
    as the summary's ``p_adjustment``: ``{"method": "holm", "m": family size, "family"}``.
    """
    cells = [cell for name, row in results.items() if name != baseline for cell in row.values()
             if cell.get("status") == "ok" and _finite(cell.get("p_raw", cell.get("p_vs_baseline")))]
    raw = [float(cell.get("p_raw", cell["p_vs_baseline"])) for cell in cells]
    for cell, p, adjusted in zip(cells, raw, holm(raw)):
        cell["p_raw"] = p
        cell["p_vs_baseline"] = adjusted
    return {"method": "holm", "m": len(cells), "family": "every non-baseline intervention x metric with a paired test"}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_cell(values: Sequence[float | None], seed: int, weights: Sequence[float] | None = None) -> dict:
    """Mean (``weights``: weighted) with a bootstrap interval over items; no test against the baseline
    (used for KL from the baseline, which is 0 there by definition, and for judge scores).

    None in ``values`` marks an item without a value (an unparsed judge answer): left out, with its
    weight; the cell then gets ``n_missing``. Raises ``ValueError`` when no item has a value."""
    items = list(values)
    keep = [i for i, x in enumerate(items) if x is not None]
    v = np.asarray([items[i] for i in keep], float)
    w = None if weights is None else np.asarray([list(weights)[i] for i in keep], float)
    ci = bootstrap_ci(v, weights=w, seed=seed)
    value = float(v.mean() if w is None else (v * w).sum() / w.sum())
    cell = {"status": "ok", "value": value, "ci": [ci["low"], ci["high"]], "ci_method": "bootstrap", "n": int(len(v)),
            "p_vs_baseline": None, "test": None}
    if len(keep) < len(items):
        cell["n_missing"] = len(items) - len(keep)
    return cell


def chance_flag(cell: dict, chance: float) -> dict:
    """Flag a benchmark whose baseline interval includes chance: it cannot show capability damage."""
    lo, hi = cell["ci"]
    return {"chance": chance, "baseline_ci": [lo, hi], "flagged": bool(lo <= chance)}

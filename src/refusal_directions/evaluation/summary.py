"""Turn per-item outcomes into the table cells of ``evaluate/summary.json``.

A cell is ``{"status": "ok", "value", "ci": [lo, hi], "n", "p_vs_baseline", "test"}`` or
``{"status": "not run", "reason"}``. Rates and accuracies are compared with the baseline by
McNemar's exact test on per-item outcomes (the same prompts or questions); losses by a paired
bootstrap over documents (token-weighted).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .stats import bootstrap_ci, mcnemar_test, paired_bootstrap_test

METRICS: dict[str, dict] = {
    "harmless_refusal": {"label": "Refusal on harmless prompts (substring)", "kind": "rate", "better": "lower", "group": "refusal"},
    "ce/general": {"label": "Cross-entropy, general text", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/alpaca": {"label": "Cross-entropy, Alpaca outputs", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/on_distribution": {"label": "Cross-entropy, baseline's own completions", "kind": "loss", "better": "lower", "group": "capability"},
    "mmlu": {"label": "MMLU 5-shot accuracy", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc": {"label": "ARC-Challenge acc", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc_norm": {"label": "ARC-Challenge acc_norm", "kind": "accuracy", "better": "higher", "group": "capability"},
}


def dataset_metrics(datasets: Sequence[str]) -> dict[str, dict]:
    """Metric descriptions for the harmful evaluation sets, then the fixed ones."""
    out = {}
    for d in datasets:
        out[f"attack_success/{d}"] = {"label": f"Attack success (substring), {d}", "kind": "rate", "better": None, "group": "refusal"}
        out[f"safety/{d}"] = {"label": f"Unsafe responses (LlamaGuard), {d}", "kind": "rate", "better": None, "group": "safety"}
    return {**out, **METRICS}


def not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason}


def binary_cell(outcomes: Sequence[bool], baseline: Sequence[bool] | None, seed: int) -> dict:
    """Rate of True outcomes with a bootstrap interval and McNemar's p against the baseline."""
    values = np.asarray(outcomes, dtype=float)
    ci = bootstrap_ci(values, seed=seed)
    cell = {"status": "ok", "value": float(values.mean()), "ci": [ci["low"], ci["high"]], "n": int(len(values)),
            "p_vs_baseline": None, "test": None}
    if baseline is not None and len(baseline) == len(values):
        cell["p_vs_baseline"] = float(mcnemar_test(baseline, outcomes)["p_value"])
        cell["test"] = "mcnemar"
    return cell


def loss_cell(doc_losses: Sequence[float], doc_tokens: Sequence[int], baseline: tuple[Sequence[float], Sequence[int]] | None,
              seed: int) -> dict:
    """Token-weighted mean loss with a bootstrap interval over documents and a paired bootstrap p."""
    losses, tokens = np.asarray(doc_losses, float), np.asarray(doc_tokens, float)
    ci = bootstrap_ci(losses, weights=tokens, seed=seed)
    cell = {"status": "ok", "value": float((losses * tokens).sum() / tokens.sum()), "ci": [ci["low"], ci["high"]],
            "n": int(len(losses)), "p_vs_baseline": None, "test": None}
    if baseline is not None and len(baseline[0]) == len(losses):
        test = paired_bootstrap_test(baseline[0], losses, weights=tokens, seed=seed)
        cell["p_vs_baseline"] = float(test["p_value"])
        cell["test"] = "paired_bootstrap"
    return cell


def chance_flag(cell: dict, chance: float) -> dict:
    """Flag a benchmark whose baseline interval includes chance: it cannot show capability damage."""
    lo, hi = cell["ci"]
    return {"chance": chance, "baseline_ci": [lo, hi], "flagged": bool(lo <= chance)}

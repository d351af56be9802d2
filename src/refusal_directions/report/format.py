"""Text of numbers, intervals, summary cells, layer lists and interventions (the report's leaf module).

Owns how a value reads in every page: "n/a" for None/NaN, significance stars, "[lo, hi]" intervals,
"0–2, 5" layer ranges, one-line intervention descriptions, the models and title of an evaluate-model
run, the statistics legend of a summary, and control-character escaping of generated text. Imports nothing from the report.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

SIGNIFICANCE_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


def is_number(x: Any) -> bool:
    """True for a finite int/float (not bool, not NaN/inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; None, NaN and non-numbers as "n/a"."""
    if not is_number(x):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_p(p: Any) -> str:
    """A p-value for tooltips ("n/a" when missing)."""
    if not is_number(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def significance_mark(p: Any) -> str:
    """"***" for p < 0.001, "**" for p < 0.01, "*" for p < 0.05, else "" (also for None/NaN)."""
    if not is_number(p):
        return ""
    for level, mark in SIGNIFICANCE_LEVELS:
        if p < level:
            return mark
    return ""


def format_interval(ci: Any, digits: int = 3) -> str:
    """"[lo, hi]" or "" when there is no usable interval."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    if not (is_number(ci[0]) or is_number(ci[1])):
        return ""
    return f"[{fmt_num(ci[0], digits)}, {fmt_num(ci[1], digits)}]"


def format_cell(cell: dict | None, digits: int = 3, with_mark: bool = True) -> str:
    """Plain-text rendering of a summary cell: "0.250 [0.100, 0.400] **", "not run" or "—"."""
    if not cell:
        return "—"
    if cell.get("status") != "ok":
        return "not run"
    text = fmt_num(cell.get("value"), digits)
    interval = format_interval(cell.get("ci"), digits)
    if interval:
        text += " " + interval
    mark = significance_mark(cell.get("p_vs_baseline")) if with_mark else ""
    return f"{text} {mark}" if mark else text


def compress_layers(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


def describe_intervention(spec: dict) -> str:
    """One line saying what an intervention from ``infer/plan.json`` / the summary does."""
    kind = spec.get("kind", "?")
    if kind == "baseline":
        return "no intervention"
    if kind == "model":
        return "the evaluated model's own weights (evaluate-model run)"
    parts = [kind]
    if kind == "actadd":
        parts.append(f"c={fmt_num(spec.get('coefficient'), 2)} at layer {spec.get('layer')}")
    else:
        scope = f"scope {spec['scope']}: " if spec.get("scope") else ""
        parts.append(f"{scope}layers {compress_layers(spec.get('layers') or [])}")
        if spec.get("components"):
            parts.append("each component's own direction")
        if spec.get("weights"):
            weights = [float(w) for w in spec["weights"]]
            parts.append(f"per-layer weights {fmt_num(min(weights), 2)}..{fmt_num(max(weights), 2)} (peak at layer "
                         f"{(spec.get('layers') or [0])[weights.index(max(weights))]})")
    parts.append(f"source pos {spec.get('position')}, layer {spec.get('layer')}")
    if kind == "reflection":
        parts.append(f"α={spec.get('alpha')} ({spec.get('mode')})")
    if spec.get("k") is not None:
        parts.append(f"k={spec.get('k')}")
    if spec.get("method") == "leace" and kind != "actadd":
        parts.append("affine" if spec.get("affine", True) else "non-affine")
    return "; ".join(parts)


def model_text(model: dict) -> str:
    """A model recorded in the manifest: "name (alias a, fingerprint f)"."""
    return f"{model.get('name') or 'unknown model'} (alias {model.get('alias', 'n/a')}, fingerprint {model.get('fingerprint', 'n/a')})"


def evaluate_model_title(evaluated: dict) -> str:
    """The title of an evaluate-model run's report: the evaluated model, and its base if any."""
    model, base = evaluated.get("model") or {}, evaluated.get("base")
    name = model.get("spec") or model.get("name") or "unknown model"
    return f"Evaluate-model run: {name}" + (f" vs base {base.get('spec') or base.get('name')}" if base else " (no base)")


def slug(text: str) -> str:
    """``text`` reduced to a file-name-safe stem ("x" when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def visible_text(text: Any) -> str:
    """``text`` with control characters (invalid in HTML, e.g. from random or broken generations)
    shown as ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def statistics_legend(summary: dict) -> str:
    """What the table's intervals and significance marks are, from what the summary records.

    Summaries written before Wilson intervals and Holm's adjustment (no ``ci_method`` / ``p_adjustment``)
    are described as they are: bootstrap intervals and unadjusted p-values.
    """
    cells = [c for row in (summary.get("results") or {}).values() for c in (row or {}).values() if isinstance(c, dict)]
    if any(c.get("ci_method") == "wilson" for c in cells):
        interval = ("95% interval: Wilson score for rates and accuracies, percentile bootstrap for means (cross-entropy "
                    "over documents, token-weighted; KL)")
    else:
        interval = "95% bootstrap interval"
    adjustment = summary.get("p_adjustment") or {}
    if adjustment.get("method") == "holm":
        p_text = (f"p-values Holm-adjusted over all {adjustment.get('m', '?')} tests of this table (every intervention × "
                  "metric; the unadjusted ones are p_raw in evaluate/summary.json)")
    else:
        p_text = "p-values not adjusted for multiple comparisons"
    return (f"Value [{interval}]; significance of the difference from baseline (McNemar's exact test on paired "
            f"outcomes, paired bootstrap for cross-entropy), {p_text}: * p<0.05, ** p<0.01, *** p<0.001.")



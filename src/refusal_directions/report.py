"""Tables and plots: one self-contained HTML report (and a Markdown summary) per run.

Inputs are the run folder's artifacts (see ``pipeline``): ``manifest.json``,
``extract/geometry.json``, ``select/<method>.json``, ``infer/plan.json``, ``infer/*/*.jsonl`` and
``evaluate/summary.json``. Whatever is missing is reported as missing; the rest is still shown.

* ``plot_selection``: per method, heatmaps of the selection scores per (position, layer);
  called by the select stage.
* ``write_report``: ``report/report.html`` (one file: CSS inline, plots as base64 PNG data URIs,
  no JavaScript) and ``report/report.md`` (plots saved beside it as PNG files).
* ``compare_runs``: one HTML page with several runs' metric tables side by side.

JSON artifacts may hold NaN (Python's ``json`` writes and reads it); it is shown as "n/a".
Figures are ``matplotlib.figure.Figure`` objects rendered to PNG by the Agg renderer, without
pyplot: nothing changes the caller's global matplotlib backend (e.g. in a notebook).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from . import __version__
from .artifacts import read_json, read_jsonl, write_bytes, write_text
from .evaluation.stats import wilson_interval
from .selection import MethodSelection

log = logging.getLogger(__name__)

METHOD_ORDER = ("diff_in_means", "inlp", "leace")
METHOD_LABELS = {"diff_in_means": "diff-in-means", "inlp": "INLP", "leace": "LEACE"}
METHOD_COLOURS = {None: "#333333", "diff_in_means": "#1f77b4", "inlp": "#d62728", "leace": "#2ca02c"}
GROUP_ORDER = ("refusal", "safety", "capability")
CE_METRICS = ("ce/general", "ce/alpaca", "ce/on_distribution")
SIGNIFICANCE_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
STAGES = ("extract", "select", "infer", "evaluate")

# Thresholds of the "Read this first" warnings (``read_first_warnings``).
MIN_VAL_PROMPTS = 16  # harmful or harmless validation prompts left after the refusal filter
MIN_EVAL_ITEMS = 50  # items of a rate or accuracy: at n=50 a 95% Wilson interval around 0.5 spans about ±0.13
CEILING_ATTACK_SUCCESS = 0.9  # baseline attack success at or above this leaves little refusal to remove

# Selection metrics: (Candidate attribute, colour-bar label, colour map). Colour maps are chosen so
# that the better end is always the bright (yellow) end of viridis.
SELECTION_METRICS: dict[str, tuple[str, str]] = {
    "bypass": ("bypass score: refusal score under removal (lower = better)", "viridis_r"),
    "steering": ("steering score: refusal score with ActAdd (higher = better)", "viridis"),
    "kl": ("KL(baseline || removal) on harmless (lower = better)", "viridis_r"),
}


# ====================================================================== formatting
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
    parts.append(f"source pos {spec.get('position')}, layer {spec.get('layer')}")
    if kind == "reflection":
        parts.append(f"α={spec.get('alpha')} ({spec.get('mode')})")
    if spec.get("k") is not None:
        parts.append(f"k={spec.get('k')}")
    if spec.get("method") == "leace" and kind != "actadd":
        parts.append("affine" if spec.get("affine", True) else "non-affine")
    return "; ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def visible_text(text: Any) -> str:
    """``text`` with control characters (invalid in HTML, e.g. from random or broken generations)
    shown as ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _md_fence(text: str) -> str:
    """A fenced code block that the text cannot close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


# ====================================================================== figures
def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def heatmap_figure(
    grid: np.ndarray,
    positions: Sequence[int],
    title: str,
    colorbar_label: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    best: tuple[int, int] | None = None,
    dimmed: np.ndarray | None = None,
    annotate: bool | None = None,
    value_format: str = "{:.2f}",
) -> Figure:
    """A (position × layer) heatmap: positions on y, layers on x, colour bar, NaN cells grey.

    ``best``: (pos index, layer) outlined and starred. ``dimmed``: boolean [P, L] mask of cells
    drawn hatched and faded (filtered-out candidates). ``annotate``: write values in the cells
    (default: when the grid is small enough to read them).
    """
    grid = np.asarray(grid, dtype=float)
    n_pos, n_layers = grid.shape
    width = min(22.0, max(5.5, 0.32 * n_layers + 2.5))
    height = max(2.2, 0.5 * n_pos + 1.4)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    vmin, vmax = _colour_range(grid, vmin, vmax)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")
    image = ax.imshow(masked, aspect="auto", cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest",
                      origin="upper")
    ax.set_xlabel("layer")
    ax.set_ylabel("position")
    ax.set_yticks(range(n_pos), [str(p) for p in positions])
    step = max(1, math.ceil(n_layers / 24))
    ax.set_xticks(range(0, n_layers, step))
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label(colorbar_label, fontsize=8)
    _mark_cells(ax, grid, dimmed, n_pos * n_layers <= 80 if annotate is None else annotate, best, value_format)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(n_pos - 0.5, -0.5)
    return fig


def _colour_range(grid: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """The colour scale's ends: given ones, else the finite values' extremes (0..1 when none);
    widened by 0.5 each way when empty or inverted."""
    finite = grid[np.isfinite(grid)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax


def _mark_cells(ax, grid: np.ndarray, dimmed: np.ndarray | None, annotate: bool, best: tuple[int, int] | None,
                value_format: str) -> None:
    """On a heatmap's axes: hatch the ``dimmed`` [P, L] cells, write each cell's value
    (``annotate``; NaN as "n/a"), and outline and star the ``best`` (pos index, layer) cell."""
    if dimmed is not None:
        for p, l in zip(*np.nonzero(np.asarray(dimmed, dtype=bool))):
            ax.add_patch(Rectangle((l - 0.5, p - 0.5), 1, 1, facecolor=(1, 1, 1, 0.45), edgecolor=(0.3, 0.3, 0.3, 0.7),
                                   hatch="///", linewidth=0))
    if annotate:
        for p in range(grid.shape[0]):
            for l in range(grid.shape[1]):
                value = grid[p, l]
                text = value_format.format(value) if math.isfinite(value) else "n/a"
                ax.text(l, p, text, ha="center", va="center", fontsize=7, color="black",
                        bbox=dict(boxstyle="round,pad=0.1", facecolor=(1, 1, 1, 0.6), linewidth=0))
    if best is not None:
        p, l = best
        ax.add_patch(Rectangle((l - 0.5, p - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.plot([l], [p - 0.32], marker="*", color="red", markersize=9, markeredgecolor="white", markeredgewidth=0.6)


def selection_grid(selection: MethodSelection, metric: str, n_layers: int, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Values [P, L] of one selection metric (NaN where no candidate) and the filtered-out mask."""
    grid = np.full((n_positions, n_layers), np.nan)
    dimmed = np.zeros((n_positions, n_layers), dtype=bool)
    for cand in selection.ranked:
        if 0 <= cand.pos_index < n_positions and 0 <= cand.layer < n_layers:
            value = getattr(cand, metric)
            grid[cand.pos_index, cand.layer] = value if is_number(value) else np.nan
            dimmed[cand.pos_index, cand.layer] = bool(cand.filtered_out)
    return grid, dimmed


def _selection_positions(selection: MethodSelection, positions: Sequence[int] | None) -> list[int]:
    n = max([c.pos_index for c in selection.ranked] + [len(positions or []) - 1]) + 1
    out = list(positions or [])
    by_index = {c.pos_index: c.position for c in selection.ranked}
    return [out[i] if i < len(out) else by_index.get(i, i) for i in range(n)]


def selection_figure(selection: MethodSelection, metric: str, n_layers: int, positions: Sequence[int] | None) -> Figure:
    """Heatmap of one selection metric ("bypass", "steering" or "kl") of one method."""
    positions = _selection_positions(selection, positions)
    n_layers = max([n_layers, *[c.layer + 1 for c in selection.ranked]])
    grid, dimmed = selection_grid(selection, metric, n_layers, len(positions))
    label, cmap = SELECTION_METRICS[metric]
    best = selection.best
    title = (f"{METHOD_LABELS.get(selection.method, selection.method)}: {metric} "
             f"(★ selected: pos {best.position}, layer {best.layer}; hatched: filtered out)")
    return heatmap_figure(grid, positions, title, label, cmap=cmap, best=(best.pos_index, best.layer), dimmed=dimmed,
                          value_format="{:.3g}")


def plot_selection(results: dict[str, MethodSelection], n_layers: int, positions: list[int], out_dir: Path) -> list[Path]:
    """Per method, PNG heatmaps of bypass, steering and KL per (position, layer) in ``out_dir``.

    Files are ``<method>_<metric>.png``, written atomically. Returns the paths written.
    """
    out_dir = Path(out_dir)
    written = []
    for method, selection in results.items():
        for metric in SELECTION_METRICS:
            fig = selection_figure(selection, metric, n_layers, positions)
            path = out_dir / f"{_slug(method)}_{metric}.png"
            write_bytes(path, figure_png(fig))
            written.append(path)
    return written


def inlp_accuracy_figure(accuracies: Sequence, positions: Sequence[int], components: Sequence[tuple[int, int]],
                         selected: tuple[int, int] | None, threshold: float | None) -> Figure:
    """INLP dev accuracy vs classifier index for some (pos index, layer) components."""
    acc = np.asarray(accuracies, dtype=float)  # [P, L, K], NaN-padded
    fig = Figure(figsize=(7.0, 3.6))
    ax = fig.add_subplot()
    for p, l in components:
        curve = acc[p, l]
        valid = np.isfinite(curve)
        if not valid.any():
            continue
        n = int(np.nonzero(valid)[0].max()) + 1
        xs = np.arange(1, n + 1)
        is_sel = selected == (p, l)
        ax.plot(xs, curve[:n], marker="o", markersize=3 if n > 20 else 4, linewidth=2.4 if is_sel else 1.2,
                label=f"pos {positions[p]}, layer {l}" + (" (selected)" if is_sel else ""), zorder=3 if is_sel else 2)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"stop threshold {threshold:g}")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("classifier index")
    ax.set_ylabel("dev accuracy")
    ax.set_ylim(0.0, 1.05)
    ax.set_title("INLP: dev accuracy of successive classifiers", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return fig


def pareto_figure(points: list[dict], x_label: str, y_label: str, baseline_x: float | None) -> Figure:
    """Attack success vs cross-entropy: one labelled point per intervention, with 95% intervals.

    Each point: {"name", "method", "x", "x_ci", "y", "y_ci"} (intervals may be None), optionally
    with "y2", "y2_ci": a second rate at the same x (coherent attack success), drawn as a hollow
    marker joined to the first by a thin line.
    """
    fig = Figure(figsize=(8.0, 5.2))
    ax = fig.add_subplot()
    second = False
    for pt in points:
        colour = METHOD_COLOURS.get(pt.get("method"), "#555555")
        xerr = _errbar(pt["x"], pt.get("x_ci"))
        yerr = _errbar(pt["y"], pt.get("y_ci"))
        ax.errorbar([pt["x"]], [pt["y"]], xerr=xerr, yerr=yerr, fmt="o", color=colour, ecolor=colour,
                    elinewidth=1, capsize=3, markersize=6, alpha=0.9)
        ax.annotate(pt["name"], (pt["x"], pt["y"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if is_number(pt.get("y2")):
            second = True
            ax.plot([pt["x"], pt["x"]], [pt["y"], pt["y2"]], color=colour, linewidth=0.6, alpha=0.6)
            ax.errorbar([pt["x"]], [pt["y2"]], yerr=_errbar(pt["y2"], pt.get("y2_ci")), fmt="s", mfc="white",
                        color=colour, ecolor=colour, elinewidth=0.8, capsize=2, markersize=6, alpha=0.9)
    if baseline_x is not None:
        ax.axvline(baseline_x, color="grey", linestyle="--", linewidth=1, label="baseline CE")
    handles = [Rectangle((0, 0), 1, 1, color=c) for m, c in METHOD_COLOURS.items() if any(p.get("method") == m for p in points)]
    labels = [METHOD_LABELS.get(m, "baseline") if m else "baseline" for m in METHOD_COLOURS if any(p.get("method") == m for p in points)]
    if second:
        handles += [Line2D([], [], marker="o", color="#555555", linestyle=""),
                    Line2D([], [], marker="s", mfc="white", color="#555555", linestyle="")]
        labels += ["attack success (filled)", "coherent attack success (hollow)"]
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Refusal removal vs damage (upper left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _errbar(value: float, ci: Any) -> list[list[float]] | None:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not (is_number(ci[0]) and is_number(ci[1])):
        return None
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


# ====================================================================== loading a run
@dataclass
class RunArtifacts:
    """What a run folder holds (each piece None / empty when missing)."""

    dir: Path
    manifest: dict | None = None
    geometry: dict | None = None
    selections: dict[str, MethodSelection] = field(default_factory=dict)
    selection_raw: dict[str, dict] = field(default_factory=dict)
    plan: list[dict] | None = None
    summary: dict | None = None
    stages: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return (self.manifest or {}).get("config") or {}

    @property
    def model(self) -> dict:
        return (self.manifest or {}).get("model") or {}

    @property
    def missing_stages(self) -> list[str]:
        return [s for s in STAGES if not self.stages.get(s)]


def _load_json(path: Path, notes: list[str]) -> Any | None:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} is unreadable ({err}); it is left out.")
        return None


def _check_key(artifacts: RunArtifacts, data: Any, stage: str, label: str) -> None:
    expected = ((artifacts.manifest or {}).get("stage_keys") or {}).get(stage)
    key = data.get("key") if isinstance(data, dict) else None
    if expected and key and key != expected:
        artifacts.notes.append(f"{label} was made with another configuration (key {key}, this run's {stage} key {expected}): "
                               "it may be stale; rerun that stage.")


def load_run(run_dir: Path) -> RunArtifacts:
    """Read every report input of a run folder that exists; note what is missing or unreadable."""
    run_dir = Path(run_dir)
    art = RunArtifacts(run_dir)
    art.manifest = _load_json(run_dir / "manifest.json", art.notes)
    if art.manifest is None:
        art.notes.append("manifest.json is missing: model and configuration are unknown.")
    art.geometry = _load_json(run_dir / "extract" / "geometry.json", art.notes)
    if art.geometry is not None:
        _check_key(art, art.geometry, "extract", "extract/geometry.json")
    art.stages["extract"] = art.geometry is not None or (run_dir / "extract" / "prompts.json").exists()
    methods = list(art.config.get("methods") or [])
    found = sorted((p.stem for p in (run_dir / "select").glob("*.json")), key=_method_sort_key)
    for method in [*[m for m in methods if m in found], *[m for m in found if m not in methods]]:
        raw = _load_json(run_dir / "select" / f"{method}.json", art.notes)
        if not isinstance(raw, dict):
            continue
        try:
            art.selections[method] = MethodSelection.from_dict(raw)
            art.selection_raw[method] = raw
            _check_key(art, raw, "select", f"select/{method}.json")
        except (KeyError, TypeError, StopIteration) as err:
            art.notes.append(f"select/{method}.json has an unexpected format ({err!r}); it is left out.")
    art.stages["select"] = bool(art.selections)
    plan = _load_json(run_dir / "infer" / "plan.json", art.notes)
    if isinstance(plan, dict):
        art.plan = list(plan.get("interventions") or [])
        _check_key(art, plan, "infer", "infer/plan.json")
    art.stages["infer"] = art.plan is not None
    summary = _load_json(run_dir / "evaluate" / "summary.json", art.notes)
    if isinstance(summary, dict):
        art.summary = summary
        _check_key(art, summary, "evaluate", "evaluate/summary.json")
    art.stages["evaluate"] = art.summary is not None
    return art


def _method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def ordered_metrics(summary: dict) -> list[str]:
    """Metric ids, grouped refusal, safety, capability (summary order within a group)."""
    metrics = summary.get("metrics") or {}

    def group_rank(mid: str) -> int:
        group = (metrics.get(mid) or {}).get("group")
        return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)

    return sorted(metrics, key=group_rank)


def intervention_names(summary: dict) -> list[str]:
    """Interventions in summary order (baseline first), plus any only present in ``results``."""
    names = [spec.get("name") for spec in summary.get("interventions") or [] if spec.get("name")]
    names += [n for n in (summary.get("results") or {}) if n not in names]
    if "baseline" in names:
        names.remove("baseline")
        names.insert(0, "baseline")
    return names


def metric_label(summary: dict, metric_id: str) -> str:
    meta = (summary.get("metrics") or {}).get(metric_id) or {}
    return str(meta.get("label") or metric_id)


def _better_arrow(summary: dict, metric_id: str) -> str:
    better = ((summary.get("metrics") or {}).get(metric_id) or {}).get("better")
    return {"lower": " ↓", "higher": " ↑"}.get(better, "")


def _cell(summary: dict, name: str, metric_id: str) -> dict | None:
    return ((summary.get("results") or {}).get(name) or {}).get(metric_id)


def _harmful_datasets(art: RunArtifacts) -> list[str]:
    """Harmful evaluation sets: from the config, else from the attack-success metric ids."""
    datasets = list(art.config.get("eval_datasets") or [])
    for mid in (art.summary or {}).get("metrics") or {}:
        if mid.startswith("attack_success/") and mid.split("/", 1)[1] not in datasets:
            datasets.append(mid.split("/", 1)[1])
    return datasets


# ====================================================================== the document builder
class _Doc:
    """Accumulates the HTML and Markdown versions of the report and its images side by side."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.images: dict[str, bytes] = {}

    def section(self, title: str, anchor: str) -> None:
        self.html.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        self.md.append(f"\n## {title}\n")

    def subsection(self, title: str) -> None:
        self.html.append(f"<h3>{html.escape(title)}</h3>")
        self.md.append(f"\n### {title}\n")

    def para(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def bullets(self, items: Iterable[str], cls: str = "") -> None:
        items = list(items)
        if not items:
            return
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<ul{attr}>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        self.md.append("\n".join(f"- {i}" for i in items) + "\n")

    def image(self, name: str, fig: Figure, alt: str) -> None:
        data = figure_png(fig)
        name = _slug(name)
        self.images[f"{name}.png"] = data
        encoded = base64.b64encode(data).decode("ascii")
        self.html.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        self.md.append(f"![{alt}]({name}.png)\n")

    def gallery_start(self) -> None:
        self.html.append('<div class="gallery">')

    def gallery_end(self) -> None:
        self.html.append("</div>")


CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin-top: 1.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.notrun { color: #a05a00; background: #fff6e5; text-align: center; white-space: nowrap; }
td.absent { color: #999; text-align: center; }
th .mid { display: block; font-weight: normal; color: #777; font-size: 0.85em; }
tr.baseline td { background: #f7f9fc; font-weight: 600; }
.scroll { overflow-x: auto; }
.sig { color: #b00020; font-weight: bold; }
.ci { color: #666; }
.flag { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.4em 0; }
.warn li { color: #8a4b00; }
.missing { background: #fdecea; border-left: 4px solid #d93025; padding: 0.4em 0.8em; }
.meta td:first-child { font-weight: 600; white-space: nowrap; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0.4em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
.example { border: 1px solid #ddd; border-radius: 4px; margin: 0.4em 0; padding: 0.4em 0.7em; }
.example .prompt { font-weight: 600; }
.example pre { white-space: pre-wrap; word-break: break-word; background: #f8f8f8; padding: 0.4em; margin: 0.3em 0; }
.verdict-refused { color: #1a7f37; font-weight: 600; } .verdict-complied { color: #b00020; font-weight: 600; }
.verdict-unknown { color: #777; }
.small { font-size: 0.85em; color: #555; }
.read-first { background: #fff3cd; border: 2px solid #e0a800; border-radius: 6px; padding: 0.5em 1.1em; margin: 1em 0; }
.read-first h2 { margin-top: 0.2em; border-bottom: none; color: #8a4b00; font-size: 1.25em; }
.read-first li { margin: 0.25em 0; }
sup { font-size: 0.7em; }
"""


def _html_page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ====================================================================== report sections
def _model_text(model: dict) -> str:
    return f"{model.get('name') or 'unknown model'} (alias {model.get('alias', 'n/a')}, fingerprint {model.get('fingerprint', 'n/a')})"


def evaluate_model_title(evaluated: dict) -> str:
    """The title of an evaluate-model run's report: the evaluated model, and its base if any."""
    model, base = evaluated.get("model") or {}, evaluated.get("base")
    name = model.get("spec") or model.get("name") or "unknown model"
    return f"Evaluate-model run: {name}" + (f" vs base {base.get('spec') or base.get('name')}" if base else " (no base)")


def _evaluate_model_rows(evaluated: dict) -> list[tuple[str, str]]:
    """The header rows naming an evaluate-model run's models and what its rows are."""
    model, base = evaluated.get("model") or {}, evaluated.get("base")
    if base:
        meaning = ("row baseline: the base model as it is (the baseline of every paired test); row model: the "
                   "evaluated model; no directions were extracted or selected")
        return [("run kind", "evaluate-model"), ("evaluated model", _model_text(model)), ("base model", _model_text(base)),
                ("rows", meaning)]
    return [("run kind", "evaluate-model"), ("evaluated model", _model_text(model)), ("base model", "none given"),
            ("rows", "row baseline: the evaluated model itself (its own numbers, no paired tests)")]


def _header(doc: _Doc, art: RunArtifacts) -> None:
    model, config, manifest = art.model, art.config, art.manifest or {}
    name = model.get("name") or "unknown model"
    evaluated = manifest.get("evaluate_model")
    title = evaluate_model_title(evaluated) if evaluated else f"Refusal directions: {name}"
    doc.html.append(f"<h1>{html.escape(str(title))}</h1>")
    doc.md.append(f"# {title}\n")
    rows = [
        *(_evaluate_model_rows(evaluated) if evaluated else []),
        ("model", _model_text(model) + (" (the model whose modules ran)" if evaluated else "")),
        ("architecture", f"{model.get('n_layers', 'n/a')} layers, d_model {model.get('d_model', 'n/a')}, "
                         f"dtype {model.get('dtype', 'n/a')}, device {model.get('device', 'n/a')}"),
        ("run", f"key {manifest.get('key', 'n/a')}, folder {art.dir}"),
        ("preset", str(config.get("preset", "n/a"))),
        ("sizes", f"n_train {config.get('n_train', 'n/a')}, n_val {config.get('n_val', 'n/a')}, "
                  f"n_test {config.get('n_test', 'n/a')}, max_new_tokens {config.get('max_new_tokens', 'n/a')}"),
        ("positions", str(config.get("positions") if config.get("positions") is not None else "all post-instruction")),
        ("methods", ", ".join(config.get("methods") or []) or "n/a"),
        ("scoring / scope", f"{config.get('scoring', 'n/a')} scoring; {_scope_text(config)}"),
        ("evaluation sets", ", ".join(config.get("eval_datasets") or []) or "n/a"),
        ("seed", str(config.get("seed", manifest.get("seed", "n/a")))),
        ("package version", f"{manifest.get('package_version', 'n/a')} (report written by {__version__})"),
        ("stage timings", _timings_text(manifest.get("timings") or {})),
    ]
    if evaluated:  # no directions: the extraction and selection settings did not apply
        rows = [r for r in rows if r[0] not in ("positions", "methods", "scoring / scope")]
        rows = [("sizes", f"n_test {config.get('n_test', 'n/a')}, max_new_tokens {config.get('max_new_tokens', 'n/a')}")
                if k == "sizes" else (k, v) for k, v in rows]
    versions = manifest.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    doc.html.append('<table class="meta">' + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>")
    doc.md.append("| | |\n|---|---|\n" + "\n".join(f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows) + "\n")
    stages = [s for s in STAGES if not (evaluated and s in ("extract", "select"))]  # evaluate-model runs have no directions
    stage_text = ", ".join(f"{s}: {'done' if art.stages.get(s) else 'missing'}" for s in stages)
    missing = [s for s in art.missing_stages if s in stages]
    if missing:
        msg = (f"Stages missing: {', '.join(missing)}. This report shows what exists ({stage_text}); "
               f"run the missing stages (e.g. `refusal-directions run` with the same settings) to complete it.")
        doc.html.append(f'<p class="missing">{html.escape(msg)}</p>')
        doc.md.append(f"> **{msg}**\n")
    else:
        doc.para(f"Stages: {stage_text}.", "small")


def _scope_text(config: dict) -> str:
    if not config:
        return "n/a"
    if config.get("just_one"):
        scopes = ["one"]
    elif config.get("top_fraction") is not None:
        scopes = [f"top:{config['top_fraction']:g}"]
    else:
        scopes = config.get("scopes") or ["all"]
    own = config.get("scope_directions") == "own"
    return (f"scopes {', '.join(scopes)} ({'each component its own direction' if own else 'best component direction'}); "
            f"selection hook points {config.get('selection_hook_points', 'full')}; protocol {config.get('protocol', 'ours')}")


def _timings_text(timings: dict) -> str:
    if not timings:
        return "n/a"
    parts = [f"{stage} {fmt_num(t, 1)} s" for stage, t in timings.items()]
    total = sum(t for t in timings.values() if is_number(t))
    return ", ".join(parts) + f" (total {total:.1f} s)"


def _html_cell(cell: dict | None, footnotes: dict[str, int], is_baseline: bool) -> str:
    if not cell:
        return '<td class="absent" title="no result">—</td>'
    if cell.get("status") != "ok":
        reason = str(cell.get("reason") or "no reason given")
        number = footnotes.setdefault(reason, len(footnotes) + 1)
        return f'<td class="notrun" title="{html.escape(reason)}">not run<sup>{number}</sup></td>'
    value = fmt_num(cell.get("value"))
    interval = format_interval(cell.get("ci"))
    mark = "" if is_baseline else significance_mark(cell.get("p_vs_baseline"))
    tip = f"n = {cell.get('n', 'n/a')}"
    if not is_baseline:
        test = cell.get("test") or "no test"
        if "p_raw" in cell:
            tip += f"; p vs baseline = {fmt_p(cell.get('p_vs_baseline'))} Holm-adjusted (raw {fmt_p(cell.get('p_raw'))}, {test})"
        else:
            tip += f"; p vs baseline = {fmt_p(cell.get('p_vs_baseline'))} ({test})"
    parts = [value]
    if interval:
        parts.append(f'<span class="ci">{html.escape(interval)}</span>')
    if mark:
        parts.append(f'<span class="sig">{mark}</span>')
    return f'<td class="num" title="{html.escape(tip)}">{" ".join(parts)}</td>'


def _md_table_cell(cell: dict | None, footnotes: dict[str, int], is_baseline: bool) -> str:
    if cell and cell.get("status") != "ok":
        reason = str(cell.get("reason") or "no reason given")
        return f"not run [{footnotes.setdefault(reason, len(footnotes) + 1)}]"
    return _md_cell(format_cell(cell, with_mark=not is_baseline))


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


def _results_table(doc: _Doc, art: RunArtifacts) -> None:
    summary = art.summary
    doc.section("Interventions × metrics", "results")
    if summary is None:
        doc.para("No evaluate/summary.json: the evaluation stage has not run, so there are no metrics yet.", "missing")
        if art.plan:
            doc.para("Planned interventions (infer/plan.json):")
            doc.bullets(f"{s.get('name')}: {describe_intervention(s)}" for s in art.plan)
        return
    metrics = ordered_metrics(summary)
    names = intervention_names(summary)
    specs = {s.get("name"): s for s in summary.get("interventions") or []}
    flags = {m for m, f in (summary.get("chance_flags") or {}).items() if (f or {}).get("flagged")}
    doc.para(statistics_legend(summary) + " ↓ lower is better, ↑ higher is better. "
             "⚠ marks a benchmark whose baseline interval includes chance.", "small")
    html_footnotes: dict[str, int] = {}
    head = "<tr><th>intervention</th>" + "".join(
        f"<th>{html.escape(metric_label(summary, m) + _better_arrow(summary, m))}{' ⚠' if m in flags else ''}"
        f' <span class="mid">{html.escape(m)}</span></th>' for m in metrics) + "</tr>"
    body = []
    for name in names:
        base = name == "baseline"
        spec = specs.get(name) or {}
        cells = "".join(_html_cell(_cell(summary, name, m), html_footnotes, base) for m in metrics)
        body.append(f'<tr class="{"baseline" if base else ""}"><td title="{html.escape(describe_intervention(spec))}">'
                    f"{html.escape(name)}</td>{cells}</tr>")
    doc.html.append(f'<div class="scroll"><table class="results">{head}{"".join(body)}</table></div>')
    if html_footnotes:
        doc.html.append('<ol class="small footnotes">' + "".join(
            f'<li value="{n}">not run: {html.escape(reason)}</li>' for reason, n in html_footnotes.items()) + "</ol>")
    md_footnotes: dict[str, int] = {}
    lines = ["| intervention | " + " | ".join(_md_cell(metric_label(summary, m) + _better_arrow(summary, m)
                                                        + (" ⚠" if m in flags else "")) for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name in names:
        lines.append(f"| {_md_cell(name)} | " + " | ".join(
            _md_table_cell(_cell(summary, name, m), md_footnotes, name == "baseline") for m in metrics) + " |")
    doc.md.append("\n".join(lines) + "\n")
    if md_footnotes:
        doc.md.append("\n".join(f"[{n}] not run: {reason}" for reason, n in md_footnotes.items()) + "\n")
    doc.subsection("What each intervention does")
    doc.bullets(f"{name}: {describe_intervention(specs.get(name) or {})}" for name in names)


def _chance_section(doc: _Doc, art: RunArtifacts) -> None:
    summary = art.summary
    if summary is None:
        return
    flags = summary.get("chance_flags") or {}
    doc.section("Benchmarks vs chance", "chance")
    if not flags:
        doc.para("No chance checks in the summary.", "small")
        return
    for mid, flag in flags.items():
        flag = flag or {}
        label = metric_label(summary, mid)
        ci = format_interval(flag.get("baseline_ci")) or "n/a"
        base = _cell(summary, "baseline", mid) or {}
        value = fmt_num(base.get("value")) if base.get("status") == "ok" else "n/a"
        if flag.get("flagged"):
            text = (f"⚠ {label} ({mid}): baseline {value} {ci} includes chance ({fmt_num(flag.get('chance'))}): "
                    "this benchmark cannot show capability damage for this model.")
            doc.html.append(f'<p class="flag">{html.escape(text)}</p>')
            doc.md.append(f"> {text}\n")
        else:
            doc.para(f"{label} ({mid}): baseline {value} {ci} is above chance ({fmt_num(flag.get('chance'))}).", "small")


def _scope_layers_text(art: RunArtifacts, method: str) -> str:
    """``label: layers`` of each scope of ``method``'s removal, from the plan ("n/a" before infer)."""
    scoped = [s for s in art.plan or [] if s.get("method") == method and s.get("kind") == "removal"
              and s.get("affine", True)]
    if not scoped:
        return "n/a"
    return "; ".join(f"{s.get('scope') or 'layers'}: {compress_layers(s.get('layers') or [])}" for s in scoped)


def _selection_section(doc: _Doc, art: RunArtifacts) -> None:
    doc.section("Selection: scores per (position, layer)", "selection")
    if not art.selections:
        doc.para("No select/<method>.json: the selection stage has not run.", "missing")
        return
    n_layers = int(art.model.get("n_layers") or 0)
    positions = (art.geometry or {}).get("positions") or art.config.get("positions")
    rows = []
    for method, sel in art.selections.items():
        best = sel.best
        raw = art.selection_raw.get(method, {})
        n_val = raw.get("n_val") or {}
        rows.append((METHOD_LABELS.get(method, method), str(best.position), str(best.layer), fmt_num(best.bypass),
                     fmt_num(best.steering), fmt_num(best.kl, 4),
                     fmt_num(best.accuracy) if best.accuracy is not None else "—",
                     str(best.k) if method == "inlp" else "—", _scope_layers_text(art, method),
                     ", ".join(best.filtered_out) or "passed", str(len(sel.skipped)),
                     f"{n_val.get('harmful', '?')}/{n_val.get('harmless', '?')}" if n_val else "n/a",
                     fmt_num(sel.spearman) if sel.spearman is not None else "—"))
    cols = ("method", "position", "layer", "bypass", "steering", "KL", "INLP dev acc", "INLP k", "scope layers",
            "filters", "skipped", "val harmful/harmless", "Spearman local/global")
    doc.html.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows) + "</table>")
    doc.md.append("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                  + "\n".join("| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows) + "\n")
    doc.para("★ / red box: the selected component; hatched cells: filtered out (KL above threshold, negative "
             "steering, late layer or an undefined score); grey: no score.", "small")
    for method, sel in art.selections.items():
        doc.subsection(METHOD_LABELS.get(method, method))
        doc.gallery_start()
        for metric in SELECTION_METRICS:
            fig = selection_figure(sel, metric, n_layers, positions)
            doc.image(f"select_{method}_{metric}", fig, f"{METHOD_LABELS.get(method, method)} {metric} per (position, layer)")
        doc.gallery_end()


def _inlp_section(doc: _Doc, art: RunArtifacts) -> None:
    geo = art.geometry or {}
    if "inlp_rank" not in geo and "inlp_accuracies" not in geo:
        return
    doc.section("INLP", "inlp")
    positions = geo.get("positions") or []
    if "inlp_accuracies" in geo:
        acc = np.asarray(geo["inlp_accuracies"], dtype=float)
        sel = art.selections.get("inlp")
        selected = (sel.best.pos_index, sel.best.layer) if sel else None
        components: list[tuple[int, int]] = [selected] if selected else []
        ranked = [(c.pos_index, c.layer) for c in sel.ranked] if sel else [
            tuple(int(i) for i in divmod(int(j), acc.shape[1])) for j in np.argsort(-np.nan_to_num(acc[..., 0], nan=-1).ravel(), kind="stable")]
        for comp in ranked:
            if len(components) >= 5:
                break
            if comp not in components:
                components.append(comp)
        threshold = art.config.get("inlp_min_accuracy")
        fig = inlp_accuracy_figure(acc, positions or list(range(acc.shape[0])), components, selected,
                                   threshold if is_number(threshold) else None)
        doc.image("inlp_accuracy_curves", fig, "INLP dev accuracy vs classifier index (selected component and the next-ranked ones)")
    if "inlp_rank" in geo:
        k = np.asarray(geo["inlp_rank"], dtype=float)  # the geometry artifact calls INLP's k "inlp_rank"
        sel = art.selections.get("inlp")
        fig = heatmap_figure(k, positions or list(range(k.shape[0])), "INLP k (classifiers in P) per (position, layer)",
                             "k", cmap="Blues", vmin=0, best=(sel.best.pos_index, sel.best.layer) if sel else None,
                             value_format="{:.0f}")
        doc.image("inlp_rank", fig, "INLP k per (position, layer)")


GEOMETRY_PLOTS = (
    ("cos_dim_inlp", "cosine(r̂, INLP first direction)", "cosine", "RdBu_r", -1.0, 1.0),
    ("angle_dim_inlp_subspace", "principal angle between span(r̂) and the INLP subspace", "degrees", "viridis_r", 0.0, 90.0),
    ("cos_dim_leace_readout", "|cosine|(r̂, LEACE read-out Σ⁻¹δ)", "|cosine|", "viridis", 0.0, 1.0),
)


def _geometry_section(doc: _Doc, art: RunArtifacts) -> None:
    geo = art.geometry
    doc.section("Geometry: how the methods' directions relate", "geometry")
    if geo is None:
        doc.para("No extract/geometry.json: the extraction stage has not run.", "missing")
        return
    present = [g for g in GEOMETRY_PLOTS if g[0] in geo]
    if not present:
        doc.para("Only diff-in-means was extracted: nothing to compare.", "small")
        return
    positions = geo.get("positions") or []
    doc.gallery_start()
    for key, title, label, cmap, vmin, vmax in present:
        grid = np.asarray(geo[key], dtype=float)
        fig = heatmap_figure(grid, positions or list(range(grid.shape[0])), title, label, cmap=cmap, vmin=vmin, vmax=vmax)
        doc.image(f"geometry_{key}", fig, title)
    doc.gallery_end()


def _pareto_section(doc: _Doc, art: RunArtifacts) -> None:
    summary = art.summary
    if summary is None:
        return
    doc.section("Refusal vs cross-entropy", "pareto")
    metrics = summary.get("metrics") or {}
    datasets = [d for d in _harmful_datasets(art) if f"attack_success/{d}" in metrics]
    if not datasets:
        doc.para("No attack-success metric in the summary: nothing to plot.", "small")
        return
    y_id = f"attack_success/{datasets[0]}"
    y2_id = f"coherent_attack_success/{datasets[0]}"
    names = intervention_names(summary)
    x_id = next((m for m in CE_METRICS if m in metrics and any((_cell(summary, n, m) or {}).get("status") == "ok" for n in names)), None)
    if x_id is None:
        doc.para("No cross-entropy metric was computed: the Pareto plot is left out.", "small")
        return
    specs = {s.get("name"): s for s in summary.get("interventions") or []}
    points, skipped = [], []
    for name in names:
        x, y = _cell(summary, name, x_id) or {}, _cell(summary, name, y_id) or {}
        if x.get("status") == "ok" and y.get("status") == "ok" and is_number(x.get("value")) and is_number(y.get("value")):
            point = {"name": name, "method": (specs.get(name) or {}).get("method"), "x": float(x["value"]),
                     "x_ci": x.get("ci"), "y": float(y["value"]), "y_ci": y.get("ci")}
            y2 = _cell(summary, name, y2_id) or {}
            if y2.get("status") == "ok" and is_number(y2.get("value")):
                point.update(y2=float(y2["value"]), y2_ci=y2.get("ci"))
            points.append(point)
        else:
            skipped.append(name)
    base = _cell(summary, "baseline", x_id) or {}
    baseline_x = float(base["value"]) if base.get("status") == "ok" and is_number(base.get("value")) else None
    if points:
        fig = pareto_figure(points, f"{metric_label(summary, x_id)} ({x_id}, nats/token)",
                            f"{metric_label(summary, y_id)} ({y_id})", baseline_x)
        shown = f"{y_id} (filled) and {y2_id} (hollow)" if any("y2" in p for p in points) else y_id
        doc.image("pareto", fig, f"{shown} vs {x_id}, one point per intervention (bars: 95% intervals)")
    if skipped:
        doc.para(f"Not plotted (a metric not run or n/a): {', '.join(skipped)}.", "small")


def _examples(art: RunArtifacts, per_intervention: int = 3) -> tuple[dict[str, list[dict]], str]:
    """First harmful examples per intervention, from the summary, else from the raw completions."""
    harmful = _harmful_datasets(art)
    harmless = art.config.get("harmless_eval", "harmless_test")

    def is_harmful(dataset: Any) -> bool:
        return dataset != harmless and (not harmful or dataset in harmful)

    examples = (art.summary or {}).get("examples") or {}
    if examples:
        names = intervention_names(art.summary or {})
        out = {}
        for name in [*[n for n in names if n in examples], *[n for n in examples if n not in names]]:
            chosen = [r for r in examples.get(name) or [] if is_harmful(r.get("dataset"))]
            if chosen:
                out[name] = chosen[:per_intervention]
        return out, "evaluate/summary.json (substring judge)"
    out = {}
    for spec in art.plan or []:
        name = str(spec.get("name"))
        for dataset in harmful:
            path = art.dir / "infer" / name / f"{dataset}.jsonl"
            try:
                rows = read_jsonl(path) if path.exists() else []
            except (OSError, ValueError):
                rows = []
            if rows:
                out[name] = [{"dataset": dataset, "prompt": r.get("prompt", ""), "response": r.get("response", ""),
                              "refused": None} for r in rows[:per_intervention]]
                break
    return out, "the generated completions (not judged yet: the evaluation stage has not run)"


def example_coherence_text(row: dict) -> str:
    """The coherence verdict and figures of one example ("" when the summary has none):
    ``degenerate (repetition, ce); repetition 0.67, longest repeat 12 words, CE 4.12 nats/token (unmodified model); refusal onset: delayed``."""
    if "degenerate" not in row:
        return ""
    reasons = row.get("degenerate_reasons") or []
    parts = [("degenerate" + (f" ({', '.join(map(str, reasons))})" if reasons else "")) if row["degenerate"] else "coherent"]
    figures = row.get("coherence") or {}
    numbers = []
    if is_number(figures.get("repetition")):
        numbers.append(f"repetition {fmt_num(figures['repetition'], 2)}")
    if is_number(figures.get("longest_repeat_words")):
        numbers.append(f"longest repeat {int(figures['longest_repeat_words'])} words")
    if is_number(figures.get("ce")):
        numbers.append(f"CE {fmt_num(figures['ce'], 2)} nats/token (unmodified model)")
    else:
        numbers.append("CE n/a")
    parts.append(", ".join(numbers))
    if row.get("refusal_onset") in ("start", "delayed"):
        parts.append(f"refusal onset: {row['refusal_onset']}")
    return "; ".join(parts)


def _examples_section(doc: _Doc, art: RunArtifacts) -> None:
    doc.section("Example completions", "examples")
    examples, source = _examples(art)
    if not examples:
        doc.para("No completions yet: the generation stage has not run.", "missing")
        return
    doc.para(f"First harmful prompts per intervention, from {source}.", "small")
    for name, rows in examples.items():
        doc.html.append(f"<details{' open' if name == 'baseline' else ''}><summary><b>{html.escape(name)}</b> "
                        f"({len(rows)} examples)</summary>")
        doc.md.append(f"\n**{_md_cell(name)}**\n")
        for row in rows:
            refused = row.get("refused")
            verdict, cls = ({True: ("refused", "verdict-refused"), False: ("not refused", "verdict-complied")}
                            .get(refused, ("not judged", "verdict-unknown")))
            prompt, response = visible_text(row.get("prompt", "")), visible_text(row.get("response", ""))
            coherence = example_coherence_text(row)
            doc.html.append(
                f'<div class="example"><div class="prompt">[{html.escape(str(row.get("dataset", "")))}] '
                f"{html.escape(prompt)}</div><pre>{html.escape(response)}</pre>"
                f'<div>substring judge: <span class="{cls}">{verdict}</span>'
                + (f" · {html.escape(coherence)}" if coherence else "") + "</div></div>")
            doc.md.append(f"- *{_md_cell(row.get('dataset', ''))}*: {_md_cell(prompt)} — substring judge: **{verdict}**"
                          + (f"; {_md_cell(coherence)}" if coherence else "") + "\n\n"
                          + "\n".join("  " + line for line in _md_fence(response).splitlines()) + "\n")
        doc.html.append("</details>")


def _per_category_section(doc: _Doc, art: RunArtifacts) -> None:
    per_cat = (art.summary or {}).get("per_category") or {}
    if not per_cat:
        return
    doc.section("Attack success per category", "categories")
    names = [n for n in intervention_names(art.summary or {}) if n in per_cat] + [n for n in per_cat if n not in intervention_names(art.summary or {})]
    datasets: list[str] = []
    for n in names:
        datasets += [d for d in per_cat[n] if d not in datasets]
    for dataset in datasets:
        cats: list[str] = []
        for n in names:
            cats += [c for c in (per_cat[n].get(dataset) or {}) if c not in cats]
        doc.subsection(dataset)
        head = "<tr><th>category</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
        rows = []
        md_rows = []
        for cat in cats:
            vals = []
            for n in names:
                entry = (per_cat[n].get(dataset) or {}).get(cat) or {}
                vals.append(f"{fmt_num(entry.get('attack_success'), 2)} (n={entry.get('n', '?')})" if entry else "—")
            rows.append(f"<tr><td>{html.escape(cat)}</td>" + "".join(f'<td class="num">{html.escape(v)}</td>' for v in vals) + "</tr>")
            md_rows.append(f"| {_md_cell(cat)} | " + " | ".join(_md_cell(v) for v in vals) + " |")
        doc.html.append(f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>')
        doc.md.append("| category | " + " | ".join(_md_cell(n) for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
                      + "\n".join(md_rows) + "\n")


def _notes(art: RunArtifacts) -> list[str]:
    notes = []
    if art.missing_stages:
        notes.append(f"Missing stages: {', '.join(art.missing_stages)} (the report shows what exists).")
    for method, raw in art.selection_raw.items():
        if raw.get("fallback_warning"):
            notes.append(f"Selection fallback: {raw['fallback_warning']}")
    summary = art.summary or {}
    notes += [str(n) for n in summary.get("notes") or []]
    for mid, flag in (summary.get("chance_flags") or {}).items():
        if (flag or {}).get("flagged"):
            notes.append(f"{metric_label(summary, mid)} ({mid}): baseline interval includes chance; it cannot show capability damage here.")
    not_run: dict[tuple[str, str], list[str]] = {}
    for name in intervention_names(summary):
        for mid in ordered_metrics(summary):
            cell = _cell(summary, name, mid)
            if cell and cell.get("status") != "ok":
                not_run.setdefault((mid, str(cell.get("reason") or "no reason given")), []).append(name)
    for (mid, reason), names in not_run.items():
        who = "all interventions" if len(names) == len(intervention_names(summary)) else ", ".join(names)
        notes.append(f"Not run: {metric_label(summary, mid)} ({mid}) for {who}: {reason}")
    if art.config.get("reflection_mode") and any(s.get("kind") == "reflection" for s in art.plan or []):
        notes.append(f"Reflection interventions use the {art.config['reflection_mode']!r} mode.")
    return notes + art.notes


def read_first_warnings(art: RunArtifacts) -> list[str]:
    """The warnings that change how the report's tables must be read, from the run's artifacts.

    In this order: a selection that fell back to an unfiltered candidate (``fallback_warning`` in
    ``select/<method>.json``); a thin selection set (fewer than ``MIN_VAL_PROMPTS`` harmful or harmless
    validation prompts after the refusal filter, ``n_val`` there); baseline attack success already at the
    ceiling (at least ``CEILING_ATTACK_SUCCESS`` or an interval reaching 1); thin evaluation sets (a rate or
    accuracy of the baseline on fewer than ``MIN_EVAL_ITEMS`` items); benchmarks whose baseline interval
    includes chance (``chance_flags`` of ``evaluate/summary.json``). Both report pages show them at the top.
    """
    warnings = [f"Selection fallback: {raw['fallback_warning']} The {METHOD_LABELS.get(method, method)} rows use a "
                "component that failed the selection filters."
                for method, raw in art.selection_raw.items() if raw.get("fallback_warning")]
    summary = art.summary or {}
    return [*warnings, *_thin_selection_warnings(art), *_ceiling_warnings(summary), *_thin_evaluation_warnings(summary),
            *_chance_warnings(summary)]


def _thin_selection_warnings(art: RunArtifacts) -> list[str]:
    """One warning per distinct thin validation set of ``select/<method>.json`` (methods grouped)."""
    groups: dict[tuple[Any, Any], list[str]] = {}
    for method, raw in art.selection_raw.items():
        n_val = raw.get("n_val") or {}
        h, b = n_val.get("harmful"), n_val.get("harmless")
        if any(isinstance(x, int) and x < MIN_VAL_PROMPTS for x in (h, b)):
            groups.setdefault((h, b), []).append(METHOD_LABELS.get(method, method))
    if not groups:
        return []
    prompts = _load_json(art.dir / "extract" / "prompts.json", [])
    drawn = ""
    if isinstance(prompts, dict) and prompts.get("harmful_val"):
        after = ", after the refusal filter" if art.config.get("filter_train", True) else ""
        drawn = f" (of {len(prompts['harmful_val'])} and {len(prompts.get('harmless_val') or [])} drawn{after})"
    return [f"Thin selection set: {', '.join(methods)} ranked candidates on {h} harmful and {b} harmless validation "
            f"prompts{drawn}; with under {MIN_VAL_PROMPTS} the bypass and KL scores are noisy and the chosen component "
            "may change with the sample. Draw more with --n-val (and --val-from-train beyond the 39 prompts of "
            "harmful_val)." for (h, b), methods in groups.items()]


def _ok_baseline(summary: dict, metric_id: str) -> dict | None:
    cell = _cell(summary, "baseline", metric_id)
    return cell if cell and cell.get("status") == "ok" and is_number(cell.get("value")) else None


def _ceiling_warnings(summary: dict) -> list[str]:
    """Harmful sets whose baseline attack success leaves little refusal to remove."""
    out = []
    for mid in summary.get("metrics") or {}:
        base = _ok_baseline(summary, mid) if mid.startswith("attack_success/") else None
        if base is None:
            continue
        ci = base.get("ci")
        high = ci[1] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
        if base["value"] >= CEILING_ATTACK_SUCCESS or (is_number(high) and high >= 1.0):
            out.append(f"Ceiling: baseline attack success on {mid.split('/', 1)[1]} is already {fmt_num(base['value'])} "
                       f"{format_interval(ci)} (warned at {CEILING_ATTACK_SUCCESS:g} or an interval reaching 1): the model "
                       "rarely refuses these prompts, so there is little refusal to remove and this column cannot show "
                       "what removal does.")
    return out


def _thin_evaluation_warnings(summary: dict) -> list[str]:
    """One warning listing the rates and accuracies measured on fewer than ``MIN_EVAL_ITEMS`` items."""
    metrics = summary.get("metrics") or {}
    by_n: dict[int, list[str]] = {}
    for mid in ordered_metrics(summary):
        base = _ok_baseline(summary, mid)
        n = (base or {}).get("n")
        if (metrics.get(mid) or {}).get("kind") in ("rate", "accuracy") and isinstance(n, int) and 0 < n < MIN_EVAL_ITEMS:
            by_n.setdefault(n, []).append(mid)
    if not by_n:
        return []
    smallest = min(by_n)
    low, high = wilson_interval(smallest // 2, smallest)
    groups = "; ".join(f"n={n}: {', '.join(by_n[n])}" for n in sorted(by_n, reverse=True))
    return [f"Thin evaluation sets (under {MIN_EVAL_ITEMS} items): {groups}. With n={smallest} a 95% interval around 0.5 "
            f"spans about ±{(high - low) / 2:.2f}: only large differences can show as significant."]


def _chance_warnings(summary: dict) -> list[str]:
    return [f"Chance level: {metric_label(summary, mid)} ({mid}): the baseline's interval "
            f"{format_interval(flag.get('baseline_ci')) or 'n/a'} includes chance ({fmt_num(flag.get('chance'), 2)}); "
            "this benchmark cannot show capability damage for this model."
            for mid, flag in (summary.get("chance_flags") or {}).items() if (flag or {}).get("flagged")]


def _read_first(doc: _Doc, art: RunArtifacts) -> None:
    """The "Read this first" box (HTML) / block quote (Markdown); nothing when there is no warning."""
    warnings = read_first_warnings(art)
    if not warnings:
        return
    doc.html.append('<div class="read-first" id="read-first"><h2>⚠ Read this first</h2><ul>'
                    + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")
    doc.md.append("> **⚠ Read this first**\n>\n" + "\n".join(f"> - {w}" for w in warnings) + "\n")


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report/report.html`` (self-contained) and ``report/report.md`` (+ PNGs) for a run folder.

    Works on partial runs: missing stages are named and their sections say so.
    """
    run_dir = Path(run_dir)
    art = load_run(run_dir)
    doc = _Doc()
    _header(doc, art)
    sections: list[Callable[[_Doc, RunArtifacts], None]] = [
        _read_first, _results_table, _chance_section, _pareto_section, _selection_section, _inlp_section, _geometry_section,
        _per_category_section, _examples_section,
    ]
    for section in sections:
        try:
            section(doc, art)
        except Exception as err:  # one broken artifact must not cost the whole report
            log.warning("Report section %s failed: %r", section.__name__, err, exc_info=True)
            art.notes.append(f"The {section.__name__.strip('_').replace('_', ' ')} could not be rendered: {err!r}")
    doc.section("Notes", "notes")
    notes = _notes(art)
    if notes:
        doc.bullets(notes, "warn")
    else:
        doc.para("No warnings.")
    out_dir = run_dir / "report"
    for name, data in doc.images.items():
        write_bytes(out_dir / name, data)
    evaluated = (art.manifest or {}).get("evaluate_model")
    title = evaluate_model_title(evaluated) if evaluated else f"Refusal directions report: {art.model.get('name', run_dir.name)}"
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text(html_path, _html_page(title, "\n".join(doc.html)))
    write_text(md_path, "\n".join(doc.md).strip() + "\n")
    return html_path, md_path


# ====================================================================== several runs
def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """One HTML page with several runs' metric tables aligned by intervention and metric.

    Rows: metric, then intervention; columns: runs. Runs without ``evaluate/summary.json`` are listed
    with what is missing.
    """
    arts = [load_run(Path(d)) for d in run_dirs]
    parts = _compare_header(arts) + _compare_table([a.summary or {} for a in arts])
    notes = [f"R{i}: {note}" for i, a in enumerate(arts, 1) for note in a.notes]
    notes += [f"R{i}: no evaluate/summary.json (stages missing: {', '.join(a.missing_stages)})."
              for i, a in enumerate(arts, 1) if a.summary is None]
    if notes:
        parts.append("<h2>Notes</h2><ul class=\"warn\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    out = Path(out)
    write_text(out, _html_page("Refusal directions: runs compared", "\n".join(parts)))
    return out


def _compare_header(arts: list[RunArtifacts]) -> list[str]:
    """HTML parts opening the comparison page: the title, one row per run (model, key, preset,
    status) and the runs' "Read this first" warnings."""
    parts = ["<h1>Refusal directions: runs compared</h1>", "<table class=\"meta\"><tr><th>run</th><th>model</th>"
             "<th>key</th><th>preset</th><th>status</th></tr>"]
    for i, art in enumerate(arts, 1):
        status = "complete" if not art.missing_stages else f"missing {', '.join(art.missing_stages)}"
        parts.append(f"<tr><td>R{i}</td><td>{html.escape(str(art.model.get('name', 'unknown')))} "
                     f"({html.escape(str(art.model.get('alias', 'n/a')))})</td>"
                     f"<td>{html.escape(str((art.manifest or {}).get('key', 'n/a')))}</td>"
                     f"<td>{html.escape(str(art.config.get('preset', 'n/a')))}</td><td>{html.escape(status)}</td></tr>")
    parts.append("</table>")
    warnings = [f"R{i}: {w}" for i, a in enumerate(arts, 1) for w in read_first_warnings(a)]
    if warnings:
        parts.append('<div class="read-first" id="read-first"><h2>⚠ Read this first</h2><ul>'
                     + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")
    return parts


def _compare_table(summaries: list[dict]) -> list[str]:
    """HTML parts of the comparison's metric table (rows: metric, then intervention; columns: the runs'
    ``summaries``, R1, R2, ...) and its footnotes, or a note that no run has a summary yet."""
    parts: list[str] = []
    metrics: list[str] = []
    names: list[str] = []
    labels: dict[str, str] = {}
    for s in summaries:
        for m in ordered_metrics(s):
            if m not in metrics:
                metrics.append(m)
                labels[m] = metric_label(s, m) + _better_arrow(s, m)
        names += [n for n in intervention_names(s) if n not in names]
    footnotes: dict[str, int] = {}
    if metrics:
        parts.append('<p class="small">Value [95% interval] and significance vs that run\'s baseline '
                     "(* p<0.05, ** p<0.01, *** p<0.001; p-values Holm-adjusted within each run whose summary records "
                     "p_adjustment); — where a run lacks the intervention or metric; "
                     "⚠ where the run flags the benchmark as not above chance.</p>")
        head = "<tr><th>metric</th><th>intervention</th>" + "".join(f"<th>R{i}</th>" for i in range(1, len(summaries) + 1)) + "</tr>"
        rows = []
        for m in metrics:
            present = [n for n in names if any(_cell(s, n, m) is not None for s in summaries)]
            for j, n in enumerate(present):
                first = (f'<td rowspan="{len(present)}"><b>{html.escape(labels[m])}</b> <span class="mid">{html.escape(m)}</span></td>'
                         if j == 0 else "")
                cells = []
                for s in summaries:
                    flagged = ((s.get("chance_flags") or {}).get(m) or {}).get("flagged")
                    cell_html = _html_cell(_cell(s, n, m), footnotes, n == "baseline")
                    if flagged and _cell(s, n, m):
                        cell_html = cell_html.replace("</td>", " ⚠</td>", 1)
                    cells.append(cell_html)
                rows.append(f'<tr class="{"baseline" if n == "baseline" else ""}">{first}<td>{html.escape(n)}</td>{"".join(cells)}</tr>')
        parts.append(f'<div class="scroll"><table class="results">{head}{"".join(rows)}</table></div>')
        if footnotes:
            parts.append('<ol class="small">' + "".join(f'<li value="{k}">not run: {html.escape(r)}</li>' for r, k in footnotes.items()) + "</ol>")
    else:
        parts.append('<p class="missing">None of these runs has an evaluate/summary.json yet.</p>')
    return parts


__all__ = ["compare_runs", "load_run", "plot_selection", "write_report", "significance_mark", "format_cell"]

"""Figures: matplotlib heatmaps, INLP accuracy curves and the Pareto plot, rendered to PNG bytes.

Owns every figure of the report and ``plot_selection`` (the select stage's heatmaps). Figures are
``matplotlib.figure.Figure`` objects rendered by the Agg renderer without pyplot: nothing changes
the caller's global matplotlib backend (e.g. in a notebook). Pages receive PNG bytes, never figures.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..artifacts import write_bytes
from ..selection import MethodSelection
from .format import is_number, slug
from .load import METHOD_LABELS

METHOD_COLOURS = {None: "#333333", "diff_in_means": "#1f77b4", "inlp": "#d62728", "leace": "#2ca02c"}

# Selection metrics: (Candidate attribute, colour-bar label, colour map). Colour maps are chosen so
# that the better end is always the bright (yellow) end of viridis.
SELECTION_METRICS: dict[str, tuple[str, str]] = {
    "bypass": ("bypass score: refusal score under removal (lower = better)", "viridis_r"),
    "steering": ("steering score: refusal score with ActAdd (higher = better)", "viridis"),
    "kl": ("KL(baseline || removal) on harmless (lower = better)", "viridis_r"),
}


GEOMETRY_PLOTS = (
    ("cos_dim_inlp", "cosine(r̂, INLP first direction)", "cosine", "RdBu_r", -1.0, 1.0),
    ("angle_dim_inlp_subspace", "principal angle between span(r̂) and the INLP subspace", "degrees", "viridis_r", 0.0, 90.0),
    ("cos_dim_leace_readout", "|cosine|(r̂, LEACE read-out Σ⁻¹δ)", "|cosine|", "viridis", 0.0, 1.0),
)


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
    finite = grid[np.isfinite(grid)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
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
    if dimmed is not None:
        _hatch_cells(ax, dimmed)
    if annotate if annotate is not None else n_pos * n_layers <= 80:
        _annotate_cells(ax, grid, value_format)
    if best is not None:
        _mark_best(ax, best)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(n_pos - 0.5, -0.5)
    return fig


def _hatch_cells(ax: Any, dimmed: np.ndarray) -> None:
    """Draw the cells of a boolean [P, L] mask hatched and faded."""
    for p, l in zip(*np.nonzero(np.asarray(dimmed, dtype=bool))):
        ax.add_patch(Rectangle((l - 0.5, p - 0.5), 1, 1, facecolor=(1, 1, 1, 0.45), edgecolor=(0.3, 0.3, 0.3, 0.7),
                               hatch="///", linewidth=0))


def _annotate_cells(ax: Any, grid: np.ndarray, value_format: str) -> None:
    """Write every cell's value ("n/a" when not finite) in the cell."""
    n_pos, n_layers = grid.shape
    for p in range(n_pos):
        for l in range(n_layers):
            value = grid[p, l]
            text = value_format.format(value) if math.isfinite(value) else "n/a"
            ax.text(l, p, text, ha="center", va="center", fontsize=7, color="black",
                    bbox=dict(boxstyle="round,pad=0.1", facecolor=(1, 1, 1, 0.6), linewidth=0))


def _mark_best(ax: Any, best: tuple[int, int]) -> None:
    """Outline the (pos index, layer) cell in red and star it."""
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
    """The position label of every pos index the selection covers."""
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
            path = out_dir / f"{slug(method)}_{metric}.png"
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
    """Error-bar lengths [[below], [above]] for an interval; None without a usable one."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not (is_number(ci[0]) and is_number(ci[1])):
        return None
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


# ---------------------------------------------------------------------- sweeps and the Pareto search
SWEEP_FAMILIES = {"strength": "removal strength λ", "reflection": "reflection α", "k": "INLP k (leading directions)",
                  "actadd": "ActAdd multiplier m (subtracted)"}


def sweep_lines(records: Sequence[dict], family: str) -> dict[str, list[tuple[float, float, float]]]:
    """(value, refusal proxy, KL) per line of one family of ``sweep/<method>.json`` records, sorted by
    value: one line per scope ("<scope> non-affine" for LEACE's non-affine erasure)."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for r in records:
        if r.get("family") == family and is_number(r.get("refusal")) and is_number(r.get("kl")):
            label = str(r.get("scope")) + ("" if r.get("affine", True) else " non-affine")
            lines.setdefault(label, []).append((float(r["value"]), float(r["refusal"]), float(r["kl"])))
    return {label: sorted(points) for label, points in lines.items()}


def sweep_figure(records: Sequence[dict], method: str) -> Figure:
    """Dose-response of one method: per family (a row), the refusal proxy and the KL (symmetric-log
    scale) against the swept value, one line per scope."""
    families = [f for f in SWEEP_FAMILIES if sweep_lines(records, f)]
    fig = Figure(figsize=(9.0, 2.6 * max(1, len(families))))
    axes = fig.subplots(max(1, len(families)), 2, squeeze=False)
    for row, family in enumerate(families):
        for label, points in sweep_lines(records, family).items():
            xs = [p[0] for p in points]
            axes[row][0].plot(xs, [p[1] for p in points], marker="o", markersize=3, label=label)
            axes[row][1].plot(xs, [p[2] for p in points], marker="o", markersize=3, label=label)
        axes[row][0].set_ylabel("refusal proxy (harmful)", fontsize=8)
        axes[row][1].set_ylabel("KL (harmless)", fontsize=8)
        axes[row][1].set_yscale("symlog", linthresh=1e-3)
        for ax in axes[row]:
            ax.set_xlabel(SWEEP_FAMILIES[family], fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[row][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"{METHOD_LABELS.get(method, method)}: dose-response on the selection proxies", fontsize=10)
    fig.subplots_adjust(hspace=0.45)
    return fig


def fronts_figure(trials: dict[str, Sequence[dict]], fronts: dict[str, Sequence[dict]], levels: Sequence[float]) -> Figure:
    """Every method's search trials (faint) and Pareto front (line) in (KL, refusal proxy), KL on a log
    axis (values below 1e-5 drawn at 1e-5); dotted verticals at the matched-damage KL levels."""
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    clip = lambda v: max(float(v), 1e-5)  # noqa: E731
    for method, records in trials.items():
        colour = METHOD_COLOURS.get(method, "#555555")
        ax.scatter([clip(r["kl"]) for r in records], [r["refusal"] for r in records], s=10, color=colour, alpha=0.25)
        front = sorted(fronts.get(method) or [], key=lambda r: r["kl"])
        ax.plot([clip(r["kl"]) for r in front], [r["refusal"] for r in front], marker="o", markersize=4, color=colour,
                label=f"{METHOD_LABELS.get(method, method)} front ({len(front)} of {len(records)} trials)")
    for level in levels:
        ax.axvline(level, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("KL (harmless validation prompts, proxy)")
    ax.set_ylabel("refusal proxy (harmful validation prompts)")
    ax.set_title("Pareto fronts of the search (lower left is better; dotted: matched-damage KL levels)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------- intervention geometry
CLASS_COLOURS = {"harmful": "#d62728", "harmless": "#1f77b4"}


def intervention_geometry_figure(result: dict, layer: str, columns: int = 4) -> Figure:
    """One panel per intervention of ``result`` (``evaluate/intervention_geometry.json``) at ``layer``:
    the clean harmful and harmless validation activations (pale) and the same prompts under the
    intervention (dark), in the 2-D basis (x: the unit diff-in-means direction, harmful to the right;
    y: the top principal component of the rest), with the clean class means (crosses)."""
    clean = result["clean"][layer]
    entries = [e for e in result.get("interventions") or [] if layer in e.get("layers", {})]
    rows = max(1, math.ceil(len(entries) / columns))
    fig = Figure(figsize=(3.2 * min(columns, max(1, len(entries))), 3.0 * rows))
    for i, entry in enumerate(entries):
        ax = fig.add_subplot(rows, min(columns, len(entries)), i + 1)
        for cls, colour in CLASS_COLOURS.items():
            base = np.asarray(clean[cls]["points"], dtype=float).reshape(-1, 2)
            moved = np.asarray(entry["layers"][layer][cls]["points"], dtype=float).reshape(-1, 2)
            ax.scatter(base[:, 0], base[:, 1], s=8, color=colour, alpha=0.2, linewidths=0)
            ax.scatter(moved[:, 0], moved[:, 1], s=10, color=colour, alpha=0.85, marker="^", linewidths=0)
            ax.scatter([base[:, 0].mean()], [base[:, 1].mean()], s=60, color=colour, marker="x")
        numbers = entry["layers"][layer]["harmful"]
        ax.set_title(f"{entry['name']}\nharmful: t = {numbers['axis_position']:.2f}, "
                     f"probe harmless {numbers['fraction_called_harmless']:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker=m, color=CLASS_COLOURS[c], linestyle="", alpha=a)
               for c in CLASS_COLOURS for m, a in (("o", 0.3), ("^", 0.9))]
    labels = [f"{c} {w}" for c in CLASS_COLOURS for w in ("clean", "intervened")]
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"Layer {layer} input: x = diff-in-means direction, y = top principal component of the rest",
                 fontsize=9, y=1.03)
    fig.tight_layout()
    return fig


def plot_intervention_geometry(result: dict, out_dir: Path) -> list[Path]:
    """``layer<l>.png`` in ``out_dir`` for every layer of ``result`` (written atomically); the paths."""
    written = []
    for layer in result.get("clean") or {}:
        path = Path(out_dir) / f"layer{layer}.png"
        write_bytes(path, figure_png(intervention_geometry_figure(result, layer)))
        written.append(path)
    return written

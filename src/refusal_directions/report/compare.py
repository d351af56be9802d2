"""The run comparison: one HTML page with several runs' metric tables aligned by metric and intervention.

Owns ``compare_runs``. It builds a page-model ``Page`` (runs table, the runs' "Read this first"
warnings, one metric × intervention table with a column per run, notes) and renders it with the
HTML page's renderer; cells are ``model.metric_cell``, as in a run's own report.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..artifacts import write_text
from .html_page import render_html
from .load import RunArtifacts, better_arrow, intervention_names, load_run, metric_label, ordered_metrics, summary_cell
from .model import Cell, Heading, Page, Para, ReadFirst, Row, Table, metric_cell, not_run_notes
from .read_first import read_first_warnings

LEGEND = ("Value [95% interval] and significance vs that run's baseline (* p<0.05, ** p<0.01, *** p<0.001; p-values "
          "Holm-adjusted within each run whose summary records p_adjustment); — where a run lacks the intervention or "
          "metric; ⚠ where the run flags the benchmark as not above chance.")


def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """One HTML page with several runs' metric tables aligned by intervention and metric.

    Rows: metric, then intervention; columns: runs. Runs without ``evaluate/summary.json`` are listed
    with what is missing.
    """
    arts = [load_run(Path(d)) for d in run_dirs]
    page = Page("Refusal directions: runs compared")
    page.add(Heading(1, "Refusal directions: runs compared"))
    page.add(runs_table(arts))
    warnings = [f"R{i}: {w}" for i, a in enumerate(arts, 1) for w in read_first_warnings(a)]
    if warnings:
        page.add(ReadFirst(tuple(warnings)))
    summaries = [a.summary or {} for a in arts]
    if any(ordered_metrics(s) for s in summaries):
        page.para(LEGEND, "small")
        page.add(comparison_table(summaries))
    else:
        page.para("None of these runs has an evaluate/summary.json yet.", "missing")
    notes = [f"R{i}: {note}" for i, a in enumerate(arts, 1) for note in a.notes]
    notes += [f"R{i}: no evaluate/summary.json (stages missing: {', '.join(a.missing_stages)})."
              for i, a in enumerate(arts, 1) if a.summary is None]
    if notes:
        page.add(Heading(2, "Notes"))
        page.bullets(notes, "warn")
    out = Path(out)
    write_text(out, render_html(page))
    return out


def runs_table(arts: list[RunArtifacts]) -> Table:
    """One row per run: its label (R1, R2, ...), model, key, preset and completeness."""
    rows = []
    for i, art in enumerate(arts, 1):
        status = "complete" if not art.missing_stages else f"missing {', '.join(art.missing_stages)}"
        rows.append(Row((Cell(f"R{i}"), Cell(f"{art.model.get('name', 'unknown')} ({art.model.get('alias', 'n/a')})"),
                         Cell(str((art.manifest or {}).get("key", "n/a"))), Cell(str(art.config.get("preset", "n/a"))),
                         Cell(status))))
    header = tuple(Cell(c) for c in ("run", "model", "key", "preset", "status"))
    return Table(header, rows, css="meta", row_sep="\n")


def comparison_table(summaries: list[dict]) -> Table:
    """Metric × intervention rows (each metric's first row names it), one column per run's summary."""
    metrics: list[str] = []
    names: list[str] = []
    labels: dict[str, str] = {}
    for s in summaries:
        for m in ordered_metrics(s):
            if m not in metrics:
                metrics.append(m)
                labels[m] = metric_label(s, m) + better_arrow(s, m)
        names += [n for n in intervention_names(s) if n not in names]
    footnotes: dict[str, int] = {}
    rows = []
    for m in metrics:
        present = [n for n in names if any(summary_cell(s, n, m) is not None for s in summaries)]
        for j, n in enumerate(present):
            first = (Cell(labels[m], sub=m, bold=True, rowspan=len(present)),) if j == 0 else ()
            cells = tuple(_run_cell(s, n, m, footnotes) for s in summaries)
            rows.append(Row((*first, Cell(n), *cells), css="baseline" if n == "baseline" else ""))
    header = (Cell("metric"), Cell("intervention"), *(Cell(f"R{i}") for i in range(1, len(summaries) + 1)))
    return Table(header, rows, css="results", scroll=True, footnotes=not_run_notes(footnotes), footnote_css="small")


def _run_cell(summary: dict, name: str, metric: str, footnotes: dict[str, int]) -> Cell:
    """One run's cell, marked ⚠ where that run flags the benchmark as not above chance."""
    raw = summary_cell(summary, name, metric)
    cell = metric_cell(raw, footnotes, name == "baseline")
    flagged = ((summary.get("chance_flags") or {}).get(metric) or {}).get("flagged")
    return replace(cell, suffix=" ⚠") if flagged and raw else cell

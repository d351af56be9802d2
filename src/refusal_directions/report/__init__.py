"""Tables and plots: one self-contained HTML report (and a Markdown summary) per run, and a page
comparing runs.

Inputs are the run folder's artifacts (see ``pipeline``): ``manifest.json``,
``extract/geometry.json``, ``select/<method>.json``, ``infer/plan.json``, ``infer/*/*.jsonl`` and
``evaluate/summary.json``. Whatever is missing is reported as missing; the rest is still shown.
JSON artifacts may hold NaN (Python's ``json`` writes and reads it); it is shown as "n/a".

* ``plot_selection``: per method, heatmaps of the selection scores per (position, layer);
  called by the select stage.
* ``plot_intervention_geometry``: per layer, scatter plots of the clean and intervened validation
  activations; called by the pipeline's intervention-geometry step.
* ``write_report``: ``report/report.html`` (one file: CSS inline, plots as base64 PNG data URIs,
  no JavaScript) and ``report/report.md`` (plots saved beside it as PNG files).
* ``compare_runs``: one HTML page with several runs' metric tables side by side.

Modules, in import order (each imports only modules above it; docs/architecture.md has the table):

* ``format``: text of numbers, intervals, summary cells, layers, interventions, an evaluate-model run's
  models and title; the statistics legend.
* ``load``: ``RunArtifacts``, ``load_run`` and the summary accessors.
* ``read_first``: the "Read this first" warnings.
* ``model``: the page model: ``Page`` of blocks (headings, paragraphs, ``Table`` of ``Row``/``Cell``,
  images, examples); ``metric_cell`` turns a summary cell into a table cell.
* ``figures``: matplotlib figures as PNG bytes; ``plot_selection``, ``plot_intervention_geometry``.
* ``html_page`` / ``markdown_page``: render a ``Page``; they import ``model`` only, never each other.
* ``sections``: the report's content: ``SECTIONS`` and ``build_report`` (a run -> one ``Page``).
* ``write``: ``write_report`` (build once, render twice, write the files).
* ``compare``: ``compare_runs`` (a ``Page`` rendered by ``html_page``).

Adding a section to both pages is one change in ``sections.py``: write a builder
``def my_section(page: Page, art: RunArtifacts) -> None`` that appends blocks (``page.section(title,
anchor)``, ``page.para``, ``page.add(Table(header, rows))``, ``page.add(image(name, png, alt))``) and
list it in ``SECTIONS`` at its place in the page. Both renderers draw it; a new kind of block (not a
table, paragraph, list or image) is the only case that needs a renderer in ``html_page`` and
``markdown_page`` too. Nothing here imports the pipeline.
"""

from __future__ import annotations

from .compare import compare_runs
from .figures import (GEOMETRY_PLOTS, METHOD_COLOURS, SELECTION_METRICS, figure_png, heatmap_figure,
                      inlp_accuracy_figure, intervention_geometry_figure, pareto_figure, plot_intervention_geometry,
                      plot_selection, selection_figure, selection_grid)
from .format import (compress_layers, describe_intervention, evaluate_model_title, fmt_num, fmt_p, format_cell,
                     format_interval, is_number, model_text, significance_mark, statistics_legend, visible_text)
from .html_page import CSS
from .load import (METHOD_LABELS, METHOD_ORDER, STAGES, RunArtifacts, intervention_names, load_run, metric_label,
                   ordered_metrics)
from .read_first import CEILING_ATTACK_SUCCESS, MIN_EVAL_ITEMS, MIN_VAL_PROMPTS, read_first_warnings
from .sections import CE_METRICS, SECTIONS, build_report, example_coherence_text
from .write import write_report

__all__ = ["compare_runs", "load_run", "plot_intervention_geometry", "plot_selection", "write_report", "significance_mark", "format_cell"]

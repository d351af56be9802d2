"""Writing one run's report: ``report/report.html``, ``report/report.md`` and the figures beside it.

Owns ``write_report``: load the run, build its page once (``sections``), render it as HTML and as
Markdown, and write the files atomically.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import write_bytes, write_text
from .html_page import render_html
from .load import load_run
from .markdown_page import render_markdown
from .sections import build_report


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report/report.html`` (self-contained) and ``report/report.md`` (+ PNGs) for a run folder.

    Works on partial runs: missing stages are named and their sections say so.
    """
    run_dir = Path(run_dir)
    page = build_report(load_run(run_dir))
    out_dir = run_dir / "report"
    for name, data in page.images.items():
        write_bytes(out_dir / name, data)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text(html_path, render_html(page))
    write_text(md_path, render_markdown(page))
    return html_path, md_path

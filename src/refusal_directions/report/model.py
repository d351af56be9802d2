"""The page model: the blocks, tables, rows and cells that both report pages (and the comparison) render.

A section of the report builds a ``Page`` of blocks from a run's artifacts; ``html_page`` and
``markdown_page`` each turn the same blocks into their format. Content (what a cell says, which
footnote it gets, what a tooltip reads) is decided here and in the sections, once; the renderers only
decide markup. ``metric_cell`` is the one place a summary cell becomes a table cell.

A cell carries its plain text (``Cell.plain``, what Markdown shows) and the pieces HTML styles
separately (interval, significance mark, footnote number, metric id, tooltip). Imports only
``format`` from the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .format import fmt_num, fmt_p, format_interval, significance_mark, slug


@dataclass(frozen=True)
class Cell:
    """One table cell. ``text`` is the main text; the other fields are optional decorations."""

    text: str
    css: str = ""  # HTML class: "num", "notrun", "absent" or none
    tip: str | None = None  # HTML tooltip (title attribute)
    note: int | None = None  # footnote number (a "not run" cell)
    interval: str = ""  # "[lo, hi]"
    mark: str = ""  # significance stars
    sub: str = ""  # a secondary label (the metric id under a metric's name)
    bold: bool = False
    rowspan: int | None = None
    suffix: str = ""  # appended after everything (e.g. " ⚠")

    @property
    def plain(self) -> str:
        """The cell as one line of plain text ("0.250 [0.100, 0.400] **", "not run [1]")."""
        if self.note is not None:
            return f"{self.text} [{self.note}]{self.suffix}"
        return " ".join(part for part in (self.text, self.interval, self.mark) if part) + self.suffix


@dataclass(frozen=True)
class Row:
    """A table row; ``css`` None renders a bare ``<tr>``, a string (even "") a class attribute."""

    cells: tuple[Cell, ...]
    css: str | None = None


@dataclass
class Table:
    """A table with an optional header row and footnotes (numbered from 1 in list order)."""

    header: tuple[Cell, ...] | None
    rows: list[Row]
    css: str = ""  # the table's HTML class ("meta", "results")
    scroll: bool = False  # HTML: inside a horizontally scrolling box
    footnotes: list[str] = field(default_factory=list)
    footnote_css: str = "small footnotes"
    row_sep: str = ""  # HTML: text between rows and before the closing tag

    @property
    def n_columns(self) -> int:
        """The widest row's (or the header's) number of cells."""
        return max([len(self.header or ()), *(len(r.cells) for r in self.rows)])


@dataclass(frozen=True)
class Heading:
    """Level 1: the page title; 2: a section (with an anchor); 3: a subsection."""

    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Para:
    """A paragraph; ``css`` styles it in HTML ("small", "missing")."""

    text: str
    css: str = ""


@dataclass(frozen=True)
class Quote:
    """A highlighted line: a styled paragraph in HTML, a block quote in Markdown (bold when ``strong``)."""

    text: str
    css: str
    strong: bool = False


@dataclass(frozen=True)
class Bullets:
    """A bulleted list (nothing is rendered when empty)."""

    items: tuple[str, ...]
    css: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG figure: embedded in HTML, saved beside the Markdown as ``<name>.png``."""

    name: str
    png: bytes
    alt: str


@dataclass
class Gallery:
    """Images laid out side by side in HTML (one after the other in Markdown)."""

    images: list[Image] = field(default_factory=list)


@dataclass(frozen=True)
class ReadFirst:
    """The "Read this first" box of warnings."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One completion with the judge's verdict (``verdict_css`` colours it in HTML)."""

    dataset: str
    prompt: str
    response: str
    verdict: str
    verdict_css: str
    coherence: str = ""


@dataclass
class ExampleGroup:
    """An intervention's examples: a collapsible block in HTML (``open``: expanded)."""

    name: str
    open: bool
    n: int
    examples: list[Example] = field(default_factory=list)


Block = Union[Heading, Para, Quote, Bullets, Image, Gallery, ReadFirst, Table, ExampleGroup]


@dataclass
class Page:
    """A titled list of blocks, in page order. The helpers append a block and return it."""

    title: str = ""
    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> Block:
        """Append any block."""
        self.blocks.append(block)
        return block

    def section(self, title: str, anchor: str) -> None:
        """Start a section (an anchored level-2 heading)."""
        self.add(Heading(2, title, anchor))

    def subsection(self, title: str) -> None:
        """Start a subsection (a level-3 heading)."""
        self.add(Heading(3, title))

    def para(self, text: str, css: str = "") -> None:
        """Append a paragraph."""
        self.add(Para(text, css))

    def bullets(self, items: Sequence[str], css: str = "") -> None:
        """Append a bulleted list."""
        self.add(Bullets(tuple(items), css))

    def gallery(self) -> Gallery:
        """Append an empty gallery; images added to it later still render in it."""
        gallery = Gallery()
        self.add(gallery)
        return gallery

    @property
    def images(self) -> dict[str, bytes]:
        """Every image's file name (``<name>.png``) and PNG bytes, in page order."""
        found: dict[str, bytes] = {}
        for block in self.blocks:
            for item in block.images if isinstance(block, Gallery) else [block]:
                if isinstance(item, Image):
                    found[f"{item.name}.png"] = item.png
        return found


def image(name: str, png: bytes, alt: str) -> Image:
    """An image block whose name is made file-name safe."""
    return Image(slug(name), png, alt)


def metric_cell(cell: dict | None, footnotes: dict[str, int], is_baseline: bool) -> Cell:
    """A summary cell as a table cell: "—" when absent, "not run" with a footnote (numbered in
    ``footnotes``, reason -> number, in order of first use), else value, interval, stars (none on the
    baseline) and a tooltip with n and the p-value."""
    if not cell:
        return Cell("—", css="absent", tip="no result")
    if cell.get("status") != "ok":
        reason = str(cell.get("reason") or "no reason given")
        return Cell("not run", css="notrun", tip=reason, note=footnotes.setdefault(reason, len(footnotes) + 1))
    tip = f"n = {cell.get('n', 'n/a')}"
    if not is_baseline:
        test = cell.get("test") or "no test"
        if "p_raw" in cell:
            tip += f"; p vs baseline = {fmt_p(cell.get('p_vs_baseline'))} Holm-adjusted (raw {fmt_p(cell.get('p_raw'))}, {test})"
        else:
            tip += f"; p vs baseline = {fmt_p(cell.get('p_vs_baseline'))} ({test})"
    mark = "" if is_baseline else significance_mark(cell.get("p_vs_baseline"))
    return Cell(fmt_num(cell.get("value")), css="num", tip=tip, interval=format_interval(cell.get("ci")), mark=mark)


def not_run_notes(footnotes: dict[str, int]) -> list[str]:
    """The footnote texts of ``metric_cell``'s numbering, in number order."""
    return [f"not run: {reason}" for reason, _ in sorted(footnotes.items(), key=lambda kv: kv[1])]

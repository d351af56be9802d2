"""The HTML page: one self-contained file (CSS inline, figures as base64 PNG data URIs, no JavaScript).

Owns ``render_html`` (a ``Page`` of the page model to a complete document), the stylesheet and the
markup of every block. Every text is escaped here; content comes from the page model only.
Imports only ``model`` from the report.
"""

from __future__ import annotations

import base64
import html
from typing import Callable

from .model import (Block, Bullets, Cell, ExampleGroup, Gallery, Heading, Image, Page, Para, Quote, ReadFirst, Row,
                    Table)

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


def render_html(page: Page) -> str:
    """The page as a complete HTML document."""
    return document(page.title, "\n".join(render_blocks(page.blocks)))


def document(title: str, body: str) -> str:
    """An HTML document with the report's stylesheet around ``body``."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def render_blocks(blocks: list[Block]) -> list[str]:
    """The HTML chunks of the blocks (the page joins them with newlines)."""
    return [chunk for block in blocks for chunk in RENDERERS[type(block)](block)]


def _class(css: str) -> str:
    return f' class="{css}"' if css else ""


def _heading(block: Heading) -> list[str]:
    anchor = f' id="{block.anchor}"' if block.anchor else ""
    return [f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>"]


def _para(block: Para) -> list[str]:
    return [f"<p{_class(block.css)}>{html.escape(block.text)}</p>"]


def _quote(block: Quote) -> list[str]:
    return [f"<p{_class(block.css)}>{html.escape(block.text)}</p>"]


def _bullets(block: Bullets) -> list[str]:
    if not block.items:
        return []
    return [f"<ul{_class(block.css)}>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>"]


def _image(block: Image) -> list[str]:
    encoded = base64.b64encode(block.png).decode("ascii")
    return [f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(block.alt)}">'
            f"<figcaption>{html.escape(block.alt)}</figcaption></figure>"]


def _gallery(block: Gallery) -> list[str]:
    return ['<div class="gallery">', *(chunk for image in block.images for chunk in _image(image)), "</div>"]


def _read_first(block: ReadFirst) -> list[str]:
    return ['<div class="read-first" id="read-first"><h2>⚠ Read this first</h2><ul>'
            + "".join(f"<li>{html.escape(w)}</li>" for w in block.items) + "</ul></div>"]


def cell_html(cell: Cell, tag: str = "td") -> str:
    """One cell: its attributes (rowspan, class, tooltip), text, footnote, interval, stars, sub-label."""
    attrs = (f' rowspan="{cell.rowspan}"' if cell.rowspan is not None else "") + _class(cell.css)
    if cell.tip is not None:
        attrs += f' title="{html.escape(cell.tip)}"'
    content = f"<b>{html.escape(cell.text)}</b>" if cell.bold else html.escape(cell.text)
    if cell.note is not None:
        content += f"<sup>{cell.note}</sup>"
    if cell.interval:
        content += f' <span class="ci">{html.escape(cell.interval)}</span>'
    if cell.mark:
        content += f' <span class="sig">{cell.mark}</span>'
    if cell.sub:
        content += f' <span class="mid">{html.escape(cell.sub)}</span>'
    return f"<{tag}{attrs}>{content}{cell.suffix}</{tag}>"


def _row(row: Row, tag: str = "td") -> str:
    css = f' class="{row.css}"' if row.css is not None else ""
    return f"<tr{css}>" + "".join(cell_html(c, tag) for c in row.cells) + "</tr>"


def _table(block: Table) -> list[str]:
    rows = ([_row(Row(block.header), "th")] if block.header is not None else []) + [_row(r) for r in block.rows]
    table = f"<table{_class(block.css)}>{block.row_sep.join(rows)}{block.row_sep}</table>"
    chunks = [f'<div class="scroll">{table}</div>' if block.scroll else table]
    if block.footnotes:
        chunks.append(f'<ol class="{block.footnote_css}">' + "".join(
            f'<li value="{n}">{html.escape(note)}</li>' for n, note in enumerate(block.footnotes, 1)) + "</ol>")
    return chunks


def _examples(block: ExampleGroup) -> list[str]:
    chunks = [f"<details{' open' if block.open else ''}><summary><b>{html.escape(block.name)}</b> "
              f"({block.n} examples)</summary>"]
    for ex in block.examples:
        chunks.append(
            f'<div class="example"><div class="prompt">[{html.escape(ex.dataset)}] '
            f"{html.escape(ex.prompt)}</div><pre>{html.escape(ex.response)}</pre>"
            f'<div>substring judge: <span class="{ex.verdict_css}">{ex.verdict}</span>'
            + (f" · {html.escape(ex.coherence)}" if ex.coherence else "") + "</div></div>")
    return chunks + ["</details>"]


RENDERERS: dict[type, Callable] = {
    Heading: _heading, Para: _para, Quote: _quote, Bullets: _bullets, Image: _image, Gallery: _gallery,
    ReadFirst: _read_first, Table: _table, ExampleGroup: _examples,
}

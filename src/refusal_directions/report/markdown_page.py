"""The Markdown page: the same blocks as the HTML page, as GitHub-flavoured Markdown.

Owns ``render_markdown`` (a ``Page`` of the page model to Markdown text; figures are referenced as
``<name>.png`` files that the caller saves beside it) and the escaping of text in table cells and
code fences. Imports only ``model`` from the report.
"""

from __future__ import annotations

import html
import re
from typing import Callable

from .model import Block, Bullets, ExampleGroup, Gallery, Heading, Image, Page, Para, Quote, ReadFirst, Table


def render_markdown(page: Page) -> str:
    """The page as Markdown text (ending in one newline)."""
    return "\n".join(render_blocks(page.blocks)).strip() + "\n"


def render_blocks(blocks: list[Block]) -> list[str]:
    """The Markdown chunks of the blocks (the page joins them with newlines)."""
    return [chunk for block in blocks for chunk in RENDERERS[type(block)](block)]


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def md_fence(text: str) -> str:
    """A fenced code block that the text cannot close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _heading(block: Heading) -> list[str]:
    hashes = "#" * block.level
    return [f"{hashes} {block.text}\n" if block.level == 1 else f"\n{hashes} {block.text}\n"]


def _para(block: Para) -> list[str]:
    return [f"{block.text}\n"]


def _quote(block: Quote) -> list[str]:
    return [f"> **{block.text}**\n" if block.strong else f"> {block.text}\n"]


def _bullets(block: Bullets) -> list[str]:
    return ["\n".join(f"- {i}" for i in block.items) + "\n"] if block.items else []


def _image(block: Image) -> list[str]:
    return [f"![{block.alt}]({block.name}.png)\n"]


def _gallery(block: Gallery) -> list[str]:
    return [chunk for image in block.images for chunk in _image(image)]


def _read_first(block: ReadFirst) -> list[str]:
    return ["> **⚠ Read this first**\n>\n" + "\n".join(f"> - {w}" for w in block.items) + "\n"]


def _table(block: Table) -> list[str]:
    n = block.n_columns
    head = "|" + " |" * n if block.header is None else "| " + " | ".join(md_cell(c.plain) for c in block.header) + " |"
    lines = [head, "|" + "---|" * n, *("| " + " | ".join(md_cell(c.plain) for c in r.cells) + " |" for r in block.rows)]
    chunks = ["\n".join(lines) + "\n"]
    if block.footnotes:
        chunks.append("\n".join(f"[{n}] {note}" for n, note in enumerate(block.footnotes, 1)) + "\n")
    return chunks


def _examples(block: ExampleGroup) -> list[str]:
    chunks = [f"\n**{md_cell(block.name)}**\n"]
    for ex in block.examples:
        chunks.append(f"- *{md_cell(ex.dataset)}*: {md_cell(ex.prompt)} — substring judge: **{ex.verdict}**"
                      + (f"; {md_cell(ex.coherence)}" if ex.coherence else "") + "\n\n"
                      + "\n".join("  " + line for line in md_fence(ex.response).splitlines()) + "\n")
    return chunks


RENDERERS: dict[type, Callable] = {
    Heading: _heading, Para: _para, Quote: _quote, Bullets: _bullets, Image: _image, Gallery: _gallery,
    ReadFirst: _read_first, Table: _table, ExampleGroup: _examples,
}

"""The report package's import rule (docs/architecture.md): each module imports only those listed for it."""

from __future__ import annotations

import ast
from pathlib import Path

import refusal_directions.report as report

PACKAGE = Path(report.__file__).parent

# module -> the report modules it may import
ALLOWED = {
    "format": set(),
    "load": set(),
    "read_first": {"format", "load"},
    "model": {"format"},
    "figures": {"format", "load"},
    "html_page": {"model"},
    "markdown_page": {"model"},
    "sections": {"figures", "format", "load", "model", "read_first"},
    "write": {"html_page", "load", "markdown_page", "sections"},
    "compare": {"html_page", "load", "model", "read_first"},
    "__init__": {"compare", "figures", "format", "html_page", "load", "read_first", "sections", "write"},
}
# modules of the package outside report/ that report/ may import
OUTSIDE = {"refusal_directions", "artifacts", "evaluation.stats", "search", "selection"}


def imports(module: str) -> tuple[set[str], set[str]]:
    """(report modules, other refusal_directions modules) that ``module`` imports, lazily or not."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            inside |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 2:
            outside |= {node.module} if node.module else {"refusal_directions"}
        elif isinstance(node, ast.ImportFrom) and node.level > 2:
            outside.add(f"level {node.level}: {node.module}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            outside |= {n.removeprefix("refusal_directions.") for n in names if n.startswith("refusal_directions")}
    return inside, outside


def test_every_module_of_the_report_is_listed():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ALLOWED)


def test_report_modules_import_only_what_their_row_allows():
    for module, allowed in ALLOWED.items():
        inside, outside = imports(module)
        assert inside <= allowed, (module, inside - allowed)
        assert outside <= OUTSIDE, (module, outside - OUTSIDE)  # never the pipeline, cli or model_card


def test_the_pages_render_only_the_page_model():
    for module in ("html_page", "markdown_page"):
        assert imports(module) == ({"model"}, set())

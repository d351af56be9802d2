"""README and CI must agree: CI runs exactly the set-up and test commands a newcomer reads."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _indented_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip().startswith((".venv", "python3"))]


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    setup, run, test = _indented_commands(readme)[:3]
    assert setup.startswith("python3 -m venv .venv") and "-c constraints.txt" in setup and "[embedded,dev]" in setup
    assert run.startswith(".venv/bin/refusal-directions run")
    assert test == ".venv/bin/python -m pytest"
    assert setup in ci and f"\n{test}\n" in ci

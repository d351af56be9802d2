"""The run comparison page: runs, interventions and metrics aligned."""

from __future__ import annotations

import json
import math

from report_fixtures import METRICS, TableParser, write_fixture_run

from refusal_directions.report import compare_runs


def test_compare_runs_aligns_interventions_and_metrics(tmp_path):
    a = write_fixture_run(tmp_path / "a")
    b = write_fixture_run(tmp_path / "b", model_name="meta-llama/Llama-3.2-1B-Instruct", drop=("leace.erasure",))
    c = write_fixture_run(tmp_path / "c", model_name="google/gemma-2-2b-it", stages="select")
    out = compare_runs([a, b, c], tmp_path / "compare" / "compare.html")
    page = out.read_text()
    for name in ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "meta-llama/Llame-3.2-1B-Instruct".replace("Llame", "Llama"), "google/gemma-2-2b-it"):
        assert name in page
    assert "missing infer, evaluate" in page
    parser = TableParser()
    parser.feed(page)
    header, *rows = parser.rows
    assert [t for t, _ in header] == ["metric", "intervention", "R1", "R2", "R3"]
    sa = json.loads((a / "evaluate" / "summary.json").read_text())
    sb = json.loads((b / "evaluate" / "summary.json").read_text())
    current = None
    seen = set()
    for row in rows:
        if len(row) == 5:  # first row of a metric group carries the metric cell
            current = row[0][0].split()[-1]
            row = row[1:]
        name, (ta, _), (tb, _), (tc, _) = row[0][0], row[1], row[2], row[3]
        seen.add((current, name))
        ca = sa["results"][name][current]
        if ca["status"] == "ok" and not math.isnan(ca["value"]):
            assert ta.startswith(f"{ca['value']:.3f} [")
        if name == "leace.erasure":
            assert tb == "—"
        elif sb["results"][name][current]["status"] == "ok" and not math.isnan(sb["results"][name][current]["value"]):
            assert tb.startswith(f"{sb['results'][name][current]['value']:.3f} [")
        assert tc == "—"
    assert seen == {(m, n) for m in METRICS for n in sa["results"]}
    assert "<script" not in page.lower()

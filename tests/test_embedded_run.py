"""The quick preset on the embedded model, every stage (marked: about 20 minutes on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest

from refusal_directions import pipeline as P
from refusal_directions.config import build_config


@pytest.mark.embedded
def test_quick_preset_on_the_embedded_model(tmp_path, data_dir):
    config, _ = build_config({"preset": "quick", "device": "cpu", "data_dir": str(data_dir), "output_dir": str(tmp_path)})
    run = P.run_command("run", config)
    summary = json.loads(run.path("evaluate", "summary.json").read_text())
    results = summary["results"]
    assert {"baseline", "diff_in_means.ablation@all", "inlp.projection@all", "leace.erasure@all"} <= set(results)
    base = results["baseline"]["attack_success/jailbreakbench"]["value"]
    ablated = results["diff_in_means.ablation@all"]["attack_success/jailbreakbench"]["value"]
    assert base < 0.9, "the embedded model refuses a good share of JailbreakBench"
    assert ablated > base, "ablating the selected diff-in-means direction removes refusals"
    for cells in results.values():
        assert cells["safety/jailbreakbench"]["status"] == "not run"  # no judge offline
        assert cells["mmlu"]["status"] == "ok" and cells["ce/general"]["status"] == "ok"
    assert summary["chance_flags"]["mmlu"]["chance"] == 0.25
    assert run.path("report", "report.html").stat().st_size > 10_000

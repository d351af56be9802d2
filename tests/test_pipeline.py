"""End-to-end: every stage on a tiny random model, resume after a kill, artifact validity, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_directions import pipeline as P
from refusal_directions.config import build_config
from refusal_directions.interventions import intervene, removal_for
from tiny import save_tiny_model

TINY = {
    "device": "cpu", "preset": "quick", "n_train": 16, "n_val": 4, "n_test": 3, "positions": [-2, -1],
    "filter_train": False, "max_new_tokens": 4, "n_loss_docs": 2, "mmlu_questions": 2, "arc_questions": 2,
    "actadd_multipliers": [1.0], "reflection_alphas": [2.0], "safety_judge": "none", "batch_size": 4,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", n_layers=2, d_model=32)


def tiny_config(model: Path, out: Path, data_dir: Path, **extra):
    config, _ = build_config({**TINY, "model": str(model), "output_dir": str(out), "data_dir": str(data_dir), **extra})
    return config


@pytest.fixture(scope="module")
def complete_run(tiny_model, tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    run = P.run_command("run", tiny_config(tiny_model, out, data_dir))
    return run


def assert_same(a, b, path="results"):
    """Equal structures; floats equal to 1e-6 relative (reductions may differ in the last bits
    between processes)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def _artifact_mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "run.log") and "report" not in p.parts}


def test_run_produces_every_metric_and_the_report(complete_run):
    run = complete_run
    manifest = json.loads(run.path("manifest.json").read_text())
    assert set(manifest["timings"]) >= {"extract", "select", "infer", "evaluate"}
    assert manifest["model"]["fingerprint"] == run.adapter.fingerprint
    summary = json.loads(run.path("evaluate", "summary.json").read_text())
    names = [i["name"] for i in summary["interventions"]]
    assert names[0] == "baseline"
    assert {"diff_in_means.ablation", "inlp.projection", "leace.erasure", "leace.erasure-nonaffine",
            "diff_in_means.actadd-x1", "inlp.actadd-x1", "inlp.reflection-a2-reference"} <= set(names)
    for name in names:
        cells = summary["results"][name]
        assert set(cells) == set(summary["metrics"])
        assert cells["safety/jailbreakbench"] == {"status": "not run", "reason": "no safety judge configured (--safety-judge none)"}
        for metric in ("attack_success/jailbreakbench", "harmless_refusal", "ce/general", "ce/on_distribution", "mmlu",
                       "arc_challenge/acc", "arc_challenge/acc_norm"):
            cell = cells[metric]
            assert cell["status"] == "ok" and cell["ci"][0] <= cell["value"] <= cell["ci"][1], (name, metric, cell)
            assert (cell["p_vs_baseline"] is None) == (name == "baseline")
    assert summary["results"]["baseline"]["ce/alpaca"]["status"] == "not run"
    html = run.path("report", "report.html").read_text()
    assert "inlp.projection" in html and "leace.erasure" in html and "not run" in html
    assert run.path("report", "report.md").exists()
    plots = list(run.path("select", "plots").glob("*.png"))
    assert len(plots) == 9  # three methods x bypass, steering, KL


def test_rerun_reuses_every_artifact(complete_run, tiny_model, data_dir):
    before = _artifact_mtimes(complete_run.dir)
    run = P.run_command("run", tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir))
    assert run.dir == complete_run.dir
    assert _artifact_mtimes(run.dir) == before


def test_changing_generation_settings_keeps_directions_and_selection(complete_run, tiny_model, data_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    before = _artifact_mtimes(folder)
    config = tiny_config(tiny_model, tmp_path, data_dir, max_new_tokens=5, skip_eval=True)
    run = P.open_run(config, run_dir=folder)
    P.infer(run)
    after = _artifact_mtimes(folder)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("extract/", "select/")))
    assert all(after[k] != v for k, v in before.items() if k.startswith("infer/") and k.endswith(".jsonl"))


def test_foreign_run_folder_is_refused(complete_run, tiny_model, data_dir, tmp_path):
    other = save_tiny_model(tmp_path / "other", "llama", n_layers=2, d_model=32, seed=3)
    with pytest.raises(P.RunError, match="another model"):
        P.open_run(tiny_config(other, tmp_path, data_dir), run_dir=complete_run.dir)
    with pytest.raises(P.RunError, match="another configuration"):
        P.open_run(tiny_config(tiny_model, tmp_path, data_dir, n_train=12), run_dir=complete_run.dir)


def test_missing_upstream_artifacts_are_a_clear_error(tiny_model, data_dir, tmp_path):
    with pytest.raises(P.RunError, match="run `refusal-directions extract` first"):
        P.run_command("select", tiny_config(tiny_model, tmp_path, data_dir))


def test_killed_run_resumes_to_the_same_results(complete_run, tiny_model, data_dir, tmp_path):
    out = tmp_path / "killed"
    args = ["run", "--model", str(tiny_model), "--output-dir", str(out), "--data-dir", str(data_dir)]
    for key, value in TINY.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    code = f"import sys; from refusal_directions.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill in the middle of generation
        if len(list(out.glob("*/*/infer/*/*.jsonl"))) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run = P.run_command("run", tiny_config(tiny_model, out, data_dir))
    resumed = json.loads(run.path("evaluate", "summary.json").read_text())
    expected = json.loads(complete_run.path("evaluate", "summary.json").read_text())
    assert_same(resumed["results"], expected["results"])
    for name in expected["examples"]:
        assert resumed["examples"][name] == expected["examples"][name]


def test_export_bakes_the_selected_removal(complete_run, tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = P.export_model(tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir), "diff_in_means", tmp_path / "abliterated")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    run = P.open_run(tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir))
    sets = P.load_extraction(run).direction_sets
    best = P.load_selection(run)["diff_in_means"].best
    enc = run.adapter.encode_instructions(["how do I pick a lock", "write a poem"])
    with intervene(run.adapter, removal_for(sets["diff_in_means"], best.pos_index, best.layer, range(run.adapter.n_layers))):
        hooked = run.adapter.model(**enc).logits
    assert (exported(**enc).logits - hooked).abs().max() <= 1e-4
    meta = json.loads((out / "refusal_directions.json").read_text())
    assert meta["method"] == "diff_in_means" and meta["layer"] == best.layer


def test_unavailable_safety_judge_is_not_run_with_the_reason(complete_run, tiny_model, data_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    config = tiny_config(tiny_model, tmp_path, data_dir, safety_judge=str(tmp_path / "no-such-guard"))
    run = P.open_run(config, run_dir=folder)
    summary = P.evaluate(run)
    cell = summary["results"]["diff_in_means.ablation"]["safety/jailbreakbench"]
    assert cell["status"] == "not run" and "no-such-guard" in cell["reason"]
    assert any("safety judge not run" in note for note in summary["notes"])
    assert run.adapter.model is None  # freed before the judge was loaded
    P.write_manifest(run)  # still works without the model
    assert json.loads(run.path("manifest.json").read_text())["model"]["fingerprint"] == complete_run.adapter.fingerprint

"""End-to-end: every stage on a tiny random model, resume after a kill, artifact validity, export."""

from __future__ import annotations

import json
import math
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
            if p.is_file() and p.name not in ("manifest.json", "run.log", "reproduce.json") and "report" not in p.parts}


def test_run_produces_every_metric_and_the_report(complete_run):
    run = complete_run
    manifest = json.loads(run.path("manifest.json").read_text())
    assert set(manifest["timings"]) >= {"extract", "select", "infer", "evaluate"}
    assert manifest["model"]["fingerprint"] == run.adapter.fingerprint
    summary = json.loads(run.path("evaluate", "summary.json").read_text())
    names = [i["name"] for i in summary["interventions"]]
    assert names[0] == "baseline"
    assert {"diff_in_means.ablation@all", "inlp.projection@all", "leace.erasure@all", "leace.erasure-nonaffine@all",
            "diff_in_means.actadd-x1", "inlp.actadd-x1", "inlp.reflection-a2-reference@all"} <= set(names)
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
    for metric in ("kl/harmless", "kl/harmless_first_token"):
        assert summary["results"]["baseline"][metric]["value"] == pytest.approx(0.0, abs=1e-6)
        assert summary["results"]["diff_in_means.actadd-x1"][metric]["value"] > 1e-4
    kl = json.loads(run.path("evaluate", "diff_in_means.actadd-x1", "kl__harmless.json").read_text())
    assert len(kl["first_token"]) == 3 and kl["max_completion_tokens"] == 32
    html = run.path("report", "report.html").read_text()
    assert "inlp.projection@all" in html and "leace.erasure@all" in html and "not run" in html
    assert run.path("report", "report.md").exists()
    plots = list(run.path("select", "plots").glob("*.png"))
    assert len(plots) == 9  # three methods x bypass, steering, KL


def test_summary_has_wilson_intervals_and_holm_adjusted_p_values(complete_run):
    from refusal_directions.evaluation.stats import holm, wilson_interval

    summary = json.loads(complete_run.path("evaluate", "summary.json").read_text())
    kinds = {m: meta["kind"] for m, meta in summary["metrics"].items()}
    family = []
    for name, row in summary["results"].items():
        for metric, cell in row.items():
            if cell["status"] != "ok":
                continue
            if kinds[metric] not in ("rate", "accuracy"):  # losses, KL: means of real numbers
                assert cell["ci_method"] == "bootstrap"
            else:
                k = round(cell["value"] * cell["n"])
                assert cell["ci_method"] == "wilson" and cell["ci"] == pytest.approx(list(wilson_interval(k, cell["n"])), abs=1e-15)
            if name == "baseline":
                assert "p_raw" not in cell
            elif cell["test"] is not None:
                assert cell["p_raw"] <= cell["p_vs_baseline"] <= 1.0
                family.append(cell)
    assert summary["p_adjustment"]["method"] == "holm" and summary["p_adjustment"]["m"] == len(family) > 10
    assert [c["p_vs_baseline"] for c in family] == pytest.approx(holm([c["p_raw"] for c in family]), abs=1e-15)


def test_coherence_cells_and_thresholds_from_the_saved_features(complete_run):
    from refusal_directions.evaluation.coherence import CoherenceFeatures, calibrate, degenerate_flags

    run = complete_run
    summary = json.loads(run.path("evaluate", "summary.json").read_text())
    d = "jailbreakbench"
    new = (f"coherent_attack_success/{d}", f"degenerate/{d}", f"delayed_refusal/{d}")
    assert all(summary["metrics"][m]["group"] == "refusal" and summary["metrics"][m]["kind"] == "rate" for m in new)
    for name, cells in summary["results"].items():
        for metric in new:
            cell = cells[metric]
            assert cell["status"] == "ok" and cell["ci_method"] == "wilson", (name, metric, cell)
            assert cell["ci"][0] <= cell["value"] <= cell["ci"][1] and cell["n"] == 3, (name, metric, cell)
            assert (cell["test"] == "mcnemar") == (name != "baseline")
        assert cells[f"coherent_attack_success/{d}"]["value"] <= cells[f"attack_success/{d}"]["value"]
    # the baseline's degenerate share is the rule applied to its saved features, with the recorded thresholds
    saved = json.loads(run.path("evaluate", "baseline", f"coherence__{d}.json").read_text())
    assert saved["key"] == run.stage_key("evaluate") and len(saved["features"]) == 3
    features = [CoherenceFeatures(**f) for f in saved["features"]]
    assert all(f.ce_tokens > 0 and math.isfinite(f.ce) for f in features)  # scored by the unmodified model
    thresholds = calibrate(features)
    assert summary["coherence_thresholds"][d] == {"calibrated_on": "baseline", "quantile": 1.0, "ce_mads": 5.0,
                                                  "ce_margin": 3.0, **thresholds.to_dict()}
    flags, reasons = degenerate_flags(features, thresholds)
    assert summary["results"]["baseline"][f"degenerate/{d}"]["value"] == pytest.approx(sum(flags) / 3)
    examples = [e for e in summary["examples"]["baseline"] if e["dataset"] == d]
    assert [e["degenerate"] for e in examples] == flags and [e["degenerate_reasons"] for e in examples] == [list(r) for r in reasons]
    assert examples[0]["coherence"]["repetition"] == features[0].repetition
    assert examples[0]["refusal_onset"] in ("none", "start", "delayed")
    # the cross-entropy is the unmodified model's: the same completions score the same under every intervention
    other = json.loads(run.path("evaluate", "diff_in_means.actadd-x1", f"coherence__{d}.json").read_text())
    rows = {r["response"]: f["ce"] for r, f in zip(P.load_completions(run, P.load_plan(run)[0], d), saved["features"])}
    for r, f in zip(P.load_completions(run, next(s for s in P.load_plan(run) if s.name == "diff_in_means.actadd-x1"), d),
                    other["features"]):
        if r["response"] in rows:
            assert f["ce"] == pytest.approx(rows[r["response"]], rel=1e-5)
    cat = summary["per_category"]["baseline"][d]
    assert all(0 <= v["coherent_attack_success"] <= v["attack_success"] for v in cat.values())


def _by_text(records: list[dict]) -> set[str]:
    return {r["instruction"] for r in records}


def test_val_from_train_tops_up_validation_prompts_from_unused_train_prompts(data_dir):
    from refusal_directions.data import load_dataset, sample

    base = {"data_dir": str(data_dir), "device": "cpu", "n_train": 64, "n_val": 100}
    off = P.sample_prompts(build_config(base, gpu_available=False)[0])
    on = P.sample_prompts(build_config({**base, "val_from_train": True}, gpu_available=False)[0])
    # off: exactly the seeded samples of each split (harmful_val has only 39 prompts)
    for name, n in (("harmful_train", 64), ("harmful_val", 100), ("harmless_train", 64), ("harmless_val", 100)):
        assert off[name] == sample(load_dataset(name, data_dir), n, 42)
    assert len(off["harmful_val"]) == 39 and len(off["harmless_val"]) == 100
    # on: the whole harmful_val split (same order), then 61 harmful_train prompts not sampled for training
    assert len(on["harmful_val"]) == 100 and on["harmful_val"][:39] == off["harmful_val"]
    extra = on["harmful_val"][39:]
    assert all(r["source"] == "harmful_train" for r in extra)
    assert _by_text(extra) <= _by_text(load_dataset("harmful_train", data_dir))
    assert not _by_text(on["harmful_val"]) & _by_text(on["harmful_train"])
    assert len(_by_text(on["harmful_val"])) == 100
    # the train samples and the large-enough harmless_val split are untouched
    for name in ("harmful_train", "harmless_train", "harmless_val"):
        assert on[name] == off[name]
    # n_val within the split: the option changes nothing
    small = {**base, "n_val": 32}
    assert P.sample_prompts(build_config({**small, "val_from_train": True}, gpu_available=False)[0]) == \
        P.sample_prompts(build_config(small, gpu_available=False)[0])
    # the unused train prompts run out: 260 - 250 = 10 are left to add
    big = P.sample_prompts(build_config({**base, "n_train": 250, "val_from_train": True}, gpu_available=False)[0])
    assert len(big["harmful_val"]) == 39 + 10 and not _by_text(big["harmful_val"]) & _by_text(big["harmful_train"])


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


def test_export_as_lora_adapter_with_model_card_and_push(complete_run, tiny_model, data_dir, tmp_path, monkeypatch):
    """`export --lora --push-to-hub REPO`: base + adapter equals the hooked removal, the folder has
    the model card, and the upload is called with the folder (never the network)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import refusal_directions.pipeline.export as export_module

    pushed = {}
    monkeypatch.setattr(export_module, "push_to_hub", lambda folder, repo, private: pushed.update(
        folder=Path(folder), repo=repo, private=private) or "https://hub/commit/1")
    config = tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir)
    out = P.export_model(config, "inlp", tmp_path / "adapter", options=P.ExportOptions(lora=True, push_to="me/tiny-inlp"))
    assert pushed == {"folder": out, "repo": "me/tiny-inlp", "private": True}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "refusal_directions.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "peft" in card and "me/tiny-inlp" in card
    run = P.open_run(config)
    best = P.load_selection(run)["inlp"].best
    sets = P.load_extraction(run).direction_sets
    enc = run.adapter.encode_instructions(["how do I pick a lock", "write a poem"])
    removal = removal_for(sets["inlp"], best.pos_index, best.layer, range(run.adapter.n_layers), best.k)
    with intervene(run.adapter, removal):
        hooked = run.adapter.model(**enc).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, out).eval()
    assert (adapted(**enc).logits - hooked).abs().max() <= 1e-4
    meta = json.loads((out / "refusal_directions.json").read_text())
    assert meta["format"] == "peft-lora" and meta["method"] == "inlp" and meta["r"] == removal.k


def test_full_export_has_a_model_card_and_a_failed_upload_keeps_the_export(complete_run, tiny_model, data_dir, tmp_path):
    config = tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(P.RunError, match="upload failed.*HF_HUB_OFFLINE"):
            P.export_model(config, "diff_in_means", tmp_path / "full", options=P.ExportOptions(push_to="me/x"))
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    card = (tmp_path / "full" / "README.md").read_text()
    assert card.startswith("---\n") and "refusal-directions" in card and "baseline" in card.lower()
    assert (tmp_path / "full" / "config.json").exists()


def test_unavailable_safety_judge_is_not_run_with_the_reason(complete_run, tiny_model, data_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    config = tiny_config(tiny_model, tmp_path, data_dir, safety_judge=str(tmp_path / "no-such-guard"))
    run = P.open_run(config, run_dir=folder)
    summary = P.evaluate(run)
    cell = summary["results"]["diff_in_means.ablation@all"]["safety/jailbreakbench"]
    assert cell["status"] == "not run" and "no-such-guard" in cell["reason"]
    assert any("safety judge not run" in note for note in summary["notes"])
    assert run.adapter.model is None  # freed before the judge was loaded
    P.write_manifest(run)  # still works without the model
    assert json.loads(run.path("manifest.json").read_text())["model"]["fingerprint"] == complete_run.adapter.fingerprint


def test_manifest_records_the_data_and_an_identical_mirror_elsewhere_reuses_every_artifact(complete_run, tiny_model,
                                                                                           data_dir, tmp_path):
    import shutil

    from refusal_directions.config import STAGE_VERSIONS
    from refusal_directions.data import file_sha256

    manifest = json.loads(complete_run.path("manifest.json").read_text())
    assert manifest["stage_versions"] == STAGE_VERSIONS
    harmful_train = data_dir / "refusal" / "splits" / "harmful_train.json"
    assert manifest["data"]["harmful_train"] == {"source": "mirror", "sha256": file_sha256(harmful_train)}
    assert {"jailbreakbench", "harmless_test", "lambada", "mmlu:test", "mmlu:dev", "arc_challenge:test"} <= set(manifest["data"])
    mirror = tmp_path / "mirror"
    shutil.copytree(data_dir, mirror)
    before = _artifact_mtimes(complete_run.dir)
    run = P.run_command("run", tiny_config(tiny_model, Path(complete_run.config.output_dir), mirror))
    assert run.dir == complete_run.dir and _artifact_mtimes(run.dir) == before
    copied = mirror / "refusal" / "splits" / "harmful_train.json"
    copied.chmod(0o644)
    copied.write_text(json.dumps([*json.loads(copied.read_text()), {"instruction": "One more prompt."}]))
    edited = tiny_config(tiny_model, Path(complete_run.config.output_dir), mirror)
    assert edited.stage_key("extract", complete_run.adapter.fingerprint) != complete_run.stage_key("extract")
    assert edited.stage_key("select", complete_run.adapter.fingerprint) != complete_run.key  # another run folder


def test_export_of_leace_bakes_the_linear_eraser_and_replaces_atomically(complete_run, tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir)
    target = tmp_path / "erased"
    target.mkdir()
    (target / "old.txt").write_text("previous export")
    out = P.export_model(config, "leace", target)
    assert not (out / "old.txt").exists() and not (tmp_path / ".erased.partial").exists()
    meta = json.loads((out / "refusal_directions.json").read_text())
    assert meta["method"] == "leace" and meta["baked"] == "non-affine LEACE erasure"
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    run = P.open_run(config)
    sets = P.load_extraction(run).direction_sets
    best = P.load_selection(run)["leace"].best
    enc = run.adapter.encode_instructions(["how do I pick a lock", "write a poem"])
    linear = removal_for(sets["leace"], best.pos_index, best.layer, range(run.adapter.n_layers), affine=False)
    with intervene(run.adapter, linear):
        hooked = run.adapter.model(**enc).logits
    assert (exported(**enc).logits - hooked).abs().max() <= 1e-4


def test_plan_evaluates_every_scope_side_by_side(complete_run, tiny_model, data_dir):
    config = tiny_config(tiny_model, Path(complete_run.config.output_dir), data_dir, scopes=["one", "top:0.5", "all"])
    run = P.Run(config, complete_run.adapter, complete_run.dir, complete_run.key)
    sets = P.load_extraction(complete_run).direction_sets
    selections = P.load_selection(complete_run)
    plan = {s.name: s for s in P.plan_interventions(run, selections, sets)}
    pool = min(len(s.ranked) for s in selections.values())
    for method, removal in (("diff_in_means", "ablation"), ("inlp", "projection"), ("leace", "erasure")):
        ranked = selections[method].ranked
        assert plan[f"{method}.{removal}@one"].layers == (ranked[0].layer,)
        assert plan[f"{method}.{removal}@top0.5"].layers == tuple(sorted({c.layer for c in ranked[: math.ceil(pool / 2)]}))
        assert plan[f"{method}.{removal}@all"].layers == tuple(range(run.adapter.n_layers))
        for label in ("one", "top0.5", "all"):
            assert plan[f"{method}.{removal}@{label}"].scope == label
            assert f"{method}.reflection-a2-reference@{label}" in plan
    assert sum(s.kind == "actadd" for s in plan.values()) == 2  # diff-in-means and INLP, one multiplier each


def test_stages_return_data_and_the_cli_prints_it(complete_run):
    import io

    from rich.console import Console

    from refusal_directions.cli import stage_printer

    run = complete_run
    extraction = P.extract(run)  # every artifact reused
    rows = {r["method"]: r for r in extraction.separation}
    assert set(rows) == {"diff_in_means", "inlp", "leace"} and rows["inlp"]["score"].startswith("dev acc")
    assert P.load_extraction(run).separation == []  # the summary is computed by the stage, not stored
    buffer = io.StringIO()
    printer = stage_printer(Console(file=buffer, width=400))
    printer("open", run, None)
    printer("extract", run, extraction)
    printer("select", run, P.load_selection(run))
    printer("infer", run, P.load_plan(run))  # nothing to print
    printer("report", run, (Path("report.html"), Path("report.md")))
    text = buffer.getvalue()
    assert f"Run folder: {run.dir}" in text and "Extraction" in text and "best-separating position" in text
    assert "Selection (hook points: full)" in text and "layers @all" in text
    assert "Report: report.html" in text and "Summary: report.md" in text


def test_rubric_judge_runs_on_saved_completions_and_is_reused(complete_run, tiny_model, data_dir, tmp_path, monkeypatch):
    """Adding a rubric grader to a finished run judges only with it (every other evaluate artifact is
    reused), its verdicts are saved with their settings, a rerun reuses them, other settings re-judge."""
    import shutil

    from refusal_directions.evaluation.rubric import RubricJudge

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    before = _artifact_mtimes(folder)
    calls: list[int] = []

    def grade_by_content(self, texts, batch_size=None):
        calls.append(len(texts))
        return ["refused: 1" if "I cannot" in t else "refused: 0\nspecific: 3\nconvincing: 5" for t in texts]

    monkeypatch.setattr(RubricJudge, "generate", grade_by_content)
    config = tiny_config(tiny_model, tmp_path, data_dir, rubric_judge=str(tiny_model), rubric_max_completions=2,
                         rubric_scoring="generate", harmbench_judge=str(tmp_path / "no-such-classifier"))
    run = P.open_run(config, run_dir=folder)
    summary = P.evaluate(run)
    n_sets = len(summary["interventions"])
    assert calls == [2 * n_sets]  # one grader load, the first two completions of every intervention
    after = _artifact_mtimes(folder)
    changed = sorted(k for k, v in before.items() if after[k] != v)
    assert changed == ["evaluate/agreement.json", "evaluate/summary.json"]
    d = "jailbreakbench"
    saved = json.loads(run.path("evaluate", "baseline", f"rubric__{d}.json").read_text())
    assert saved["settings"]["model"] == str(tiny_model) and saved["settings"]["max_completions"] == 2
    assert saved["n"] == 2 and saved["scores"][0] in (0.0, 0.75)
    cell = summary["results"]["baseline"][f"rubric/{d}"]
    assert cell["status"] == "ok" and cell["n"] == 2 and cell["ci_method"] == "bootstrap"
    success = summary["results"]["diff_in_means.ablation@all"][f"rubric_attack_success/{d}"]
    assert success["status"] == "ok" and success["test"] == "mcnemar" and success["n"] == 2
    harmbench = summary["results"]["baseline"][f"harmbench/{d}"]
    assert harmbench["status"] == "not run" and "no-such-classifier" in harmbench["reason"]
    agreement = json.loads(run.path("evaluate", "agreement.json").read_text())
    assert agreement["key"] == run.stage_key("evaluate")
    assert agreement[d]["judges"] == ["substring", "coherent", "rubric"] == summary["judge_agreement"][d]["judges"]
    assert agreement[d]["n_judged"]["rubric"] == 2 * n_sets and agreement[d]["n_completions"] == 3 * n_sets
    # substring "success" and rubric score > 0 read the same refusal phrase here: they agree on every graded completion
    pair = next(p for p in agreement[d]["pairs"] if (p["a"], p["b"]) == ("substring", "rubric"))
    assert pair["n"] == 2 * n_sets and pair["agreement"] == 1.0

    again = P.evaluate(P.open_run(config, run_dir=folder))
    assert calls == [2 * n_sets] and again["results"] == summary["results"]  # saved verdicts reused
    more = tiny_config(tiny_model, tmp_path, data_dir, rubric_judge=str(tiny_model), rubric_max_completions=3,
                       rubric_scoring="generate", harmbench_judge="none")
    third = P.evaluate(P.open_run(more, run_dir=folder))
    assert calls == [2 * n_sets, 3 * n_sets]  # every set re-judged (its settings changed), now three completions each
    assert third["results"]["baseline"][f"rubric/{d}"]["n"] == 3
    assert third["results"]["baseline"][f"harmbench/{d}"]["reason"] == "no HarmBench classifier configured (--harmbench-judge none)"
    # the default probability scoring re-judges again, by next-token probabilities of the real tiny grader (no generate)
    by_probability = tiny_config(tiny_model, tmp_path, data_dir, rubric_judge=str(tiny_model), rubric_max_completions=3,
                                 harmbench_judge="none")
    fourth = P.evaluate(P.open_run(by_probability, run_dir=folder))
    assert calls == [2 * n_sets, 3 * n_sets] and fourth["results"]["baseline"][f"rubric/{d}"]["n"] == 3
    saved = json.loads(run.path("evaluate", "baseline", f"rubric__{d}.json").read_text())
    assert saved["settings"]["scoring"] == "probabilities" and len(saved["verdicts"]) == 3
    assert all(0 <= v["p_refused"] <= 1 and v["refused"] == int(v["p_refused"] > 0.5) for v in saved["verdicts"])


def test_evaluate_tokenizes_each_benchmark_once_for_all_interventions(complete_run, tiny_model, data_dir, tmp_path,
                                                                       monkeypatch):
    """The tokenized text, MMLU and ARC workloads are built once and scored under every
    intervention, with the same per-item results as when each intervention tokenized its own."""
    import shutil

    from refusal_directions.evaluation import benchmarks, loss

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    calls = {"text": 0, "mmlu": 0, "arc": 0}

    def counted(name, build):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return build(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(loss, "text_sequences", counted("text", loss.text_sequences))
    monkeypatch.setattr(benchmarks, "mmlu_inputs", counted("mmlu", benchmarks.mmlu_inputs))
    monkeypatch.setattr(benchmarks, "arc_inputs", counted("arc", benchmarks.arc_inputs))
    for metric in ("ce__general", "mmlu", "arc_challenge"):
        for path in (folder / "evaluate").glob(f"*/{metric}.json"):
            path.unlink()
    summary = P.evaluate(P.open_run(tiny_config(tiny_model, tmp_path, data_dir), run_dir=folder))
    assert len(summary["interventions"]) > 2 and calls == {"text": 1, "mmlu": 1, "arc": 1}
    for name in [row["name"] for row in summary["interventions"]]:
        for metric in ("ce__general", "mmlu", "arc_challenge"):
            fresh = json.loads((folder / "evaluate" / name / f"{metric}.json").read_text())
            saved = json.loads((complete_run.dir / "evaluate" / name / f"{metric}.json").read_text())
            assert_same(fresh, saved, f"{name}/{metric}")


def test_evaluate_with_a_token_budget_scores_like_count_batches(complete_run, tiny_model, data_dir, tmp_path, monkeypatch):
    """``score_tokens`` reaches every scorer call of the capability metrics and coherence (the KL
    keeps its count batches), and the results equal those of the count-limited batches."""
    import shutil

    from refusal_directions.evaluation import prefix_scorer

    folder = tmp_path / "copy"
    shutil.copytree(complete_run.dir, folder)
    budgets = []
    real = prefix_scorer.iter_final_hidden

    def recording(*args, **kwargs):
        budgets.append((kwargs.get("desc"), kwargs.get("max_tokens"), kwargs.get("batch_size")))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix_scorer, "iter_final_hidden", recording)
    metrics = ("ce__general", "ce__on_distribution", "mmlu", "arc_challenge", "coherence__harmful")
    for path in (folder / "evaluate").glob("*/*.json"):
        if path.stem in metrics or path.stem.startswith("coherence"):
            path.unlink()
    summary = P.evaluate(P.open_run(tiny_config(tiny_model, tmp_path, data_dir, score_tokens=96), run_dir=folder))
    scored = {desc.split(" ")[0] for desc, tokens, rows in budgets if tokens == 96 and rows == 96}
    assert {"loss", "MMLU", "ARC", "coherence"} <= scored
    assert all(tokens is None for desc, tokens, _ in budgets if desc.startswith("KL"))
    for name in [row["name"] for row in summary["interventions"]]:
        for path in (complete_run.dir / "evaluate" / name).glob("*.json"):
            if path.stem in metrics or path.stem.startswith("coherence"):
                fresh = json.loads((folder / "evaluate" / name / path.name).read_text())
                assert_same(fresh, json.loads(path.read_text()), f"{name}/{path.stem}")


def test_scoring_batches_use_a_token_budget_on_gpu_unless_the_batch_size_is_set(tiny_model, data_dir, tmp_path):
    from types import SimpleNamespace

    from refusal_directions.pipeline.stages.evaluate import GPU_SCORE_TOKENS, _scoring_batches

    def run(device, **extra):
        config = tiny_config(tiny_model, tmp_path, data_dir, **{"batch_size": None, **extra})
        batch = config.batch_size or (64 if device == "cuda" else 16)
        return SimpleNamespace(config=config, adapter=SimpleNamespace(input_device=torch.device(device)), batch_size=batch)

    assert _scoring_batches(run("cpu")) == {"batch_size": 8, "max_tokens": None}
    assert _scoring_batches(run("cuda")) == {"batch_size": GPU_SCORE_TOKENS, "max_tokens": GPU_SCORE_TOKENS}
    assert _scoring_batches(run("cuda", batch_size=20)) == {"batch_size": 10, "max_tokens": None}
    assert _scoring_batches(run("cpu", score_tokens=500)) == {"batch_size": 500, "max_tokens": 500}

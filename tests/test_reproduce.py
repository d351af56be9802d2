"""reproduce.json and `refusal-directions reproduce`: a rerun of a tiny CPU run is bit-identical;
a changed artifact or setting is listed with exit status 3; environment changes are warned about."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from refusal_directions import __version__
from refusal_directions import pipeline as P
from refusal_directions.artifacts import load_safetensors, read_jsonl, save_safetensors, write_json, write_jsonl
from refusal_directions.cli import main
from refusal_directions.config import STAGE_VERSIONS, build_config
from refusal_directions.pipeline.diff import Difference, diff_runs, diff_values
from refusal_directions.pipeline.reproduce import config_from_record, environment_warnings, read_record
from refusal_directions.pipeline.store import library_versions
from tiny import save_tiny_model

SETTINGS = {
    "device": "cpu", "preset": "quick", "n_train": 16, "n_val": 4, "n_test": 3, "positions": [-2, -1],
    "filter_train": False, "max_new_tokens": 4, "n_loss_docs": 2, "mmlu_questions": 2, "arc_questions": 2,
    "actadd_multipliers": [1.0], "intervention_mode": "actadd", "safety_judge": "none", "batch_size": 4,
    "methods": ["diff_in_means", "inlp"], "seed": 3,
}


@pytest.fixture(scope="module")
def original(tmp_path_factory, data_dir) -> P.Run:
    model = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", n_layers=2, d_model=32)
    out = tmp_path_factory.mktemp("runs")
    config, _ = build_config({**SETTINGS, "model": str(model), "output_dir": str(out), "data_dir": str(data_dir)})
    return P.run_command("run", config)


def _bits(t: torch.Tensor) -> bytes:
    """A tensor's bytes (NaN entries included, which ``torch.equal`` calls unequal)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_every_run_folder_records_what_reproduces_it(original):
    record = read_record(original.dir)
    manifest = json.loads(original.path("manifest.json").read_text())
    assert record["kind"] == "run" and record["package_version"] == __version__
    assert record["stage_versions"] == STAGE_VERSIONS
    assert record["config"] == original.config.to_dict() and record["seeds"] == {"seed": 3}
    assert record["model"]["fingerprint"] == original.adapter.fingerprint == record["model"]["identity"]
    assert record["model"]["path"] == str(Path(original.config.model).resolve())
    assert record["data"] == manifest["data"] and record["data"]["harmful_train"]["sha256"]
    assert record["libraries"]["torch"] == torch.__version__ and set(record["libraries"]) >= {"transformers", "numpy", "python"}
    assert record["stages"] == ["extract", "select", "infer", "evaluate"]
    config = config_from_record(record)
    assert config.stage_key("evaluate", original.adapter.fingerprint) == original.stage_key("evaluate")
    assert environment_warnings(record, config) == []


def test_reproduce_reruns_into_a_fresh_folder_bit_identically(original, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["reproduce", str(original.dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Identical: all" in printed and "WARNING: " not in printed
    # the fresh folder holds every artifact: JSON equal byte for byte, every tensor bit for bit (the order of
    # safetensors' metadata keys is not deterministic, so those files are compared by content)
    artifacts = P.diff.compared_artifacts(original.dir)
    assert artifacts == P.diff.compared_artifacts(out) and len(artifacts) > 20
    assert any(a.startswith("extract/directions_inlp") for a in artifacts) and "select/inlp.json" in artifacts
    assert any(a.startswith("infer/inlp.actadd-x1/") for a in artifacts) and "evaluate/summary.json" in artifacts
    assert all((original.dir / a).read_bytes() == (out / a).read_bytes() for a in artifacts if not a.endswith(".safetensors"))
    for a in [a for a in artifacts if a.endswith(".safetensors")]:
        (x, mx), (y, my) = load_safetensors(original.dir / a), load_safetensors(out / a)
        assert mx == my and x.keys() == y.keys() and all(_bits(x[k]) == _bits(y[k]) for k in x), a
    assert json.loads((out / "reproduce.json").read_text())["config"] == read_record(original.dir)["config"]
    with pytest.raises(P.RunError, match="not an empty folder"):
        P.reproduce_run(original.dir, out=out)


def test_changed_artifacts_and_settings_are_listed_with_exit_status_3(original, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(original.dir, tampered)
    # a direction nudged by 1e-6, one completion rewritten, and a recorded setting of the evaluate stage changed
    path = tampered / "extract" / "directions_diff_in_means.safetensors"
    tensors, metadata = load_safetensors(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] += 1e-6
    save_safetensors(path, tensors, metadata)
    completions = tampered / "infer" / "baseline" / "jailbreakbench.jsonl"
    rows = read_jsonl(completions)
    original_response = rows[1]["response"]
    rows[1]["response"] = "Sure, here is how."
    write_jsonl(completions, rows)
    record = json.loads((tampered / "reproduce.json").read_text())
    record["config"]["kl_tokens"] = 8
    write_json(tampered / "reproduce.json", record)

    assert main(["reproduce", str(tampered), "--out", str(tmp_path / "rerun")]) == 3
    printed = capsys.readouterr().out
    assert "DIFFERENT:" in printed
    result = diff_runs(tampered, tmp_path / "rerun")
    by_artifact = {}
    for d in result:
        by_artifact.setdefault(d.artifact, []).append(d)
    (tensor,) = [d for d in by_artifact["extract/directions_diff_in_means.safetensors"] if d.key == name]
    assert tensor.detail == f"1 of {tensors[name].numel()} values differ" and tensor.max_abs == pytest.approx(1e-6, rel=0.05)
    (row,) = by_artifact["infer/baseline/jailbreakbench.jsonl"]
    assert row.key == "row 1 response" and "'Sure, here is how.' != " + repr(original_response)[:40] in row.detail
    kl = {d.key: d for d in by_artifact["evaluate/baseline/kl__harmless.json"]}
    assert kl["max_completion_tokens"].detail == "32 != 8" and "key" in kl
    # nothing else of extract, select and infer differs: they do not depend on kl_tokens
    upstream = [d for d in result if d.artifact.startswith(("extract/", "select/", "infer/"))]
    assert sorted(str(d) for d in upstream) == sorted(map(str, [tensor, row]))
    assert f"  {tensor}" in printed and f"  {row}" in printed


def test_environment_changes_are_warned_about(original):
    record = json.loads(original.path("reproduce.json").read_text())
    record["libraries"] = {**library_versions(), "transformers": "0.0.1"}
    record["data"] = {**record["data"], "harmful_train": {"source": "mirror", "sha256": "0" * 64}}
    record["stage_versions"] = {**STAGE_VERSIONS, "select": 0}
    record["torch_threads"] = torch.get_num_threads() + 1
    warnings = environment_warnings(record, config_from_record(record))
    assert len(warnings) == 4
    assert "stage code versions" in warnings[0]
    assert warnings[1].startswith("library versions differ") and "transformers 0.0.1 ->" in warnings[1]
    assert warnings[2].startswith("the data differs") and "harmful_train (mirror sha256 000000000000 recorded" in warnings[2]
    assert "CPU threads" in warnings[3]


def test_a_record_of_an_unfinished_run_reruns_only_its_stages(original):
    record = {**read_record(original.dir), "stages": ["extract", "select"]}
    config = config_from_record(record)
    assert config.select_only and not config.infer_only and P.stages_for("run", config) == ["extract", "select"]
    generated = config_from_record({**record, "kind": "evaluate-model", "stages": ["infer"]})
    assert generated.infer_only and not generated.select_only
    with pytest.raises(P.RunError, match="settings this version does not know"):
        config_from_record({**record, "config": {**record["config"], "no_such_setting": 1}})


def test_a_folder_without_a_record_is_a_clear_error(tmp_path):
    with pytest.raises(P.RunError, match="reproduce.json does not exist"):
        read_record(tmp_path)


def test_diff_values_reports_exact_differences():
    a = {"x": 1.0, "y": [1, 2, 3], "s": "a", "n": float("nan"), "only": 1}
    b = {"x": 1.0 + 1e-12, "y": [1, 2], "s": "b", "n": float("nan")}
    got = list(diff_values(a, b))
    assert got[0][0] == "x" and got[0][2] == pytest.approx(1e-12, rel=1e-3)
    assert got[1] == ("y", "3 items != 2 items", None)
    assert got[2] == ("s", "'a' != 'b'", None)
    assert got[3] == ("only", "key only in the first folder", None)
    assert len(got) == 4  # NaN equals NaN
    assert str(Difference("a.json", "x", "1 != 2", 1.0)) == "a.json [x]: 1 != 2 (max abs difference 1)"

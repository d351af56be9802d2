"""The run store (pipeline.store): which folder a run owns, the manifest, and when an artifact is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_directions import pipeline as P
from refusal_directions.artifacts import save_safetensors, write_json, write_jsonl
from refusal_directions.config import STAGE_VERSIONS, STAGES, build_config
from refusal_directions.pipeline.store import valid_json, valid_jsonl, valid_safetensors
from tiny import save_tiny_model

SMALL = {"device": "cpu", "n_train": 12, "n_val": 4, "n_test": 3, "filter_train": False, "positions": [-1],
         "safety_judge": "none"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", n_layers=2, d_model=32)


def small_config(model: Path, out: Path, data_dir: Path, **extra):
    config, _ = build_config({**SMALL, "model": str(model), "output_dir": str(out), "data_dir": str(data_dir), **extra},
                             gpu_available=False)
    return config


def test_open_run_creates_the_keyed_folder_and_its_manifest(tiny_model, data_dir, tmp_path):
    config = small_config(tiny_model, tmp_path, data_dir)
    run = P.open_run(config)
    assert run.dir == tmp_path / run.adapter.alias / run.key and run.key == run.stage_key("select")
    manifest = json.loads(run.path("manifest.json").read_text())
    assert manifest["key"] == run.key and manifest["stage_versions"] == STAGE_VERSIONS
    assert manifest["stage_keys"] == {s: run.stage_key(s) for s in STAGES}
    assert manifest["model"]["fingerprint"] == run.adapter.fingerprint and manifest["config"]["n_train"] == 12
    assert run.path("run.log").exists() and run.batch_size == 16  # CPU default
    run.timings["extract"] = 1.5
    P.write_manifest(run)
    run.timings.clear()
    P.write_manifest(run)  # timings recorded before are kept
    assert json.loads(run.path("manifest.json").read_text())["timings"] == {"extract": 1.5}


def test_foreign_run_folder_is_refused(tiny_model, data_dir, tmp_path):
    run = P.open_run(small_config(tiny_model, tmp_path, data_dir))
    other = save_tiny_model(tmp_path / "other", "llama", n_layers=2, d_model=32, seed=3)
    with pytest.raises(P.RunError, match="another model"):
        P.open_run(small_config(other, tmp_path, data_dir), run_dir=run.dir)
    with pytest.raises(P.RunError, match="another configuration"):
        P.open_run(small_config(tiny_model, tmp_path, data_dir, n_train=10), run_dir=run.dir)
    forced = P.open_run(small_config(tiny_model, tmp_path, data_dir, n_train=10, force_overwrite=True), run_dir=run.dir)
    assert json.loads(forced.path("manifest.json").read_text())["key"] == forced.key != run.key


def test_missing_upstream_artifacts_are_a_clear_error(tiny_model, data_dir, tmp_path):
    with pytest.raises(P.RunError, match="run `refusal-directions extract` first"):
        P.run_command("select", small_config(tiny_model, tmp_path, data_dir))


def test_artifacts_are_valid_only_whole_and_with_their_stage_key(tmp_path):
    import torch

    path = tmp_path / "a.json"
    assert valid_json(path, "k") is None  # missing
    write_json(path, {"key": "k", "x": 1})
    assert valid_json(path, "k") == {"key": "k", "x": 1} and valid_json(path, "other") is None
    path.write_text('{"key": "k", "x"')  # truncated
    assert valid_json(path, "k") is None
    write_json(path, [1, 2])  # not a keyed document
    assert valid_json(path, "k") is None

    tensors = tmp_path / "t.safetensors"
    assert not valid_safetensors(tensors, "k")
    save_safetensors(tensors, {"x": torch.zeros(2)}, {"key": "k"})
    assert valid_safetensors(tensors, "k") and not valid_safetensors(tensors, "other")
    tensors.write_bytes(tensors.read_bytes()[:10])
    assert not valid_safetensors(tensors, "k")

    rows = tmp_path / "r.jsonl"
    assert not valid_jsonl(rows, "k", 2)
    write_jsonl(rows, [{"key": "k"}, {"key": "k"}])
    assert valid_jsonl(rows, "k", 2) and not valid_jsonl(rows, "k", 3) and not valid_jsonl(rows, "other", 2)
    write_jsonl(rows, [{"key": "k"}, {"key": "old"}])
    assert not valid_jsonl(rows, "k", 2)


def test_stages_of_each_command():
    config, _ = build_config({}, gpu_available=False)
    assert P.stages_for("run", config) == ["extract", "select", "infer", "evaluate", "report"]
    assert P.stages_for("select", config) == ["select"]
    assert P.stages_for("run", build_config({"use_existing": True}, gpu_available=False)[0]) == ["infer", "evaluate", "report"]
    assert P.stages_for("run", build_config({"resume_from_eval": True}, gpu_available=False)[0]) == ["evaluate", "report"]
    assert P.stages_for("run", build_config({"select_only": True}, gpu_available=False)[0]) == ["extract", "select"]
    assert P.stages_for("run", build_config({"use_existing": True, "extract_only": True}, gpu_available=False)[0]) == \
        ["infer", "evaluate", "report"]

"""Model card (refusal_directions.model_card): content from a real tiny run folder; push_to_hub up to the call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from refusal_directions import model_card as MC
from refusal_directions import pipeline as P
from refusal_directions.config import build_config
from refusal_directions.report import format_cell
from tiny import save_tiny_model

SMALL = {  # the smallest run that goes through every stage: one method, baseline + one removal
    "device": "cpu", "preset": "quick", "methods": ["diff_in_means"], "n_train": 8, "n_val": 4, "n_test": 2,
    "positions": [-1], "filter_train": False, "max_new_tokens": 2, "n_loss_docs": 1, "mmlu_questions": 1,
    "arc_questions": 1, "actadd_multipliers": [1.0], "intervention_mode": "reflection", "reflection_alphas": [],
    "safety_judge": "none", "batch_size": 4,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("card")
    model = save_tiny_model(root / "tiny", "llama", n_layers=2, d_model=32)
    config, _ = build_config({**SMALL, "model": str(model), "output_dir": str(root / "runs"), "data_dir": str(data_dir)})
    return P.run_command("run", config).dir


@pytest.fixture(scope="module")
def summary(run_dir) -> dict:
    return json.loads((run_dir / "evaluate" / "summary.json").read_text())


@pytest.fixture(scope="module")
def best(run_dir) -> dict:
    return json.loads((run_dir / "select" / "diff_in_means.json").read_text())["best"]


def export_meta(best: dict, **extra) -> dict:
    """What export_model writes to refusal_directions.json for diff-in-means."""
    return {"method": "diff_in_means", "baked": "directional ablation", "position": best["position"],
            "layer": best["layer"], "k": None, **extra}


def table(card: str) -> dict[str, list[str]]:
    """The evaluation table: metric id -> [baseline, this model, p, n] cells."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric | baseline |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line[2:-2].split(" | ")]
        rows[cells[0].rsplit("(`", 1)[1].rstrip("`)")] = cells[1:]
    return rows


def footnotes(card: str) -> dict[str, str]:
    return {line.split("]", 1)[0] + "]": line.split("not run: ", 1)[1] for line in card.splitlines() if line.startswith("[")}


def test_front_matter(run_dir, best):
    card = MC.render_model_card(run_dir, "diff_in_means", export_meta(best), base_model="someone/tiny-llama")
    assert card.startswith("---\n")
    data = ModelCard(card).data
    assert data.base_model == "someone/tiny-llama" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"refusal-directions", "refusal-removal", "diff-in-means", "directional-ablation"} <= set(data.tags)


def test_metrics_table_equals_the_summary_with_not_run_cells(run_dir, summary, best):
    card = MC.render_model_card(run_dir, "diff_in_means", export_meta(best))
    rows, notes = table(card), footnotes(card)
    results = summary["results"]
    assert set(rows) == set(summary["metrics"])
    assert "`diff_in_means.ablation@all`" in card
    for metric, (base, new, p, n) in rows.items():
        for text, cell in ((base, results["baseline"][metric]), (new, results["diff_in_means.ablation@all"][metric])):
            if cell["status"] == "ok":
                assert text == format_cell(cell, with_mark=False).replace("|", "\\|")
                assert text.startswith(f"{cell['value']:.3f}") and f"[{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" in text
            else:
                assert text.startswith("not run [") and notes[text.removeprefix("not run ")] == cell["reason"]
        cell = results["diff_in_means.ablation@all"][metric]
        assert n == (str(cell["n"]) if cell["status"] == "ok" else "")
        if cell["status"] == "ok" and cell.get("p_vs_baseline") is not None:
            assert p.endswith(f"({cell['test']})")
    assert rows["safety/jailbreakbench"][:2] == ["not run [1]", "not run [1]"]  # --safety-judge none
    assert "no safety judge configured" in notes["[1]"]
    assert rows["ce/alpaca"][1].startswith("not run")  # Alpaca outputs are not mirrored
    assert "p vs baseline (Holm-adjusted)" in card


def test_card_is_honest_about_the_run(run_dir, best):
    card = MC.render_model_card(run_dir, "diff_in_means", export_meta(best))
    assert "## Read this first" in card
    assert "Thin selection set" in card and "Thin evaluation sets" in card  # 4 validation prompts, 2 test prompts
    assert "| protocol | ours (selection hook points full, local scoring) |" in card
    assert f"position {best['position']}, layer {best['layer']}" in card
    assert "not a Hub id" in card  # a local model: no base_model in the front matter
    assert ModelCard(card).data.base_model is None
    assert "upload_folder(" in card and "create_repo(" in card and "--push-to-hub" in card
    assert "from_pretrained(" in card


def test_an_export_the_run_did_not_evaluate_is_not_run_everywhere(run_dir, best):
    other = export_meta(best, layer=best["layer"] - 1)
    rows = table(MC.render_model_card(run_dir, "diff_in_means", other))
    assert all(new.startswith("not run") for _, new, _, _ in rows.values())
    assert not any(base.startswith("not run") for metric, (base, *_rest) in rows.items()
                   if metric not in ("safety/jailbreakbench", "ce/alpaca", "rubric/jailbreakbench",
                                     "rubric_attack_success/jailbreakbench", "harmbench/jailbreakbench"))  # judges not run


def test_a_run_without_evaluation_says_so(run_dir, best, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "evaluate" / "summary.json").unlink()
    card = MC.render_model_card(copy, "diff_in_means", export_meta(best))
    assert "Not run: the run has no `evaluate/summary.json`" in card


def test_lora_card_from_the_export_folder(run_dir, best, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    meta = export_meta(best, format="peft-lora", r=1, lora_alpha=1, dtype="float32", target_modules=5,
                       target_parameters=0, replaced_biases=[], tied_embeddings=True)
    (folder / "refusal_directions.json").write_text(json.dumps(meta))
    path = MC.write_model_card(folder, run_dir, "diff_in_means", base_model="someone/tiny", repo_id="me/tiny-lora")
    card = path.read_text()
    assert path == folder / "README.md" and ModelCard(card).data.library_name == "peft"
    assert "lora" in ModelCard(card).data.tags and "(LoRA adapter)" in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card and "tie_word_embeddings = False" in card
    assert "r = lora_alpha = 1" in card


def test_exported_intervention_picks_the_non_affine_leace_row():
    specs = [{"name": "leace.erasure@all", "kind": "removal", "method": "leace", "layers": [0, 1], "affine": True,
              "alpha": 1.0, "position": -1, "layer": 1, "k": None, "components": []},
             {"name": "leace.erasure-nonaffine@one", "kind": "removal", "method": "leace", "layers": [1], "affine": False,
              "alpha": 1.0, "position": -1, "layer": 1, "k": None, "components": []},
             {"name": "leace.erasure-nonaffine@all", "kind": "removal", "method": "leace", "layers": [0, 1],
              "affine": False, "alpha": 1.0, "position": -1, "layer": 1, "k": None, "components": []}]
    found = MC.exported_intervention({"interventions": specs}, "leace", 2, {"position": -1, "layer": 1})
    assert found["name"] == "leace.erasure-nonaffine@all"
    assert MC.exported_intervention({"interventions": specs[:2]}, "leace", 2, {}) is None


def test_hub_base_model():
    hub_id, note = MC.hub_base_model("embedded")
    assert hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and "dequantized" in note
    assert MC.hub_base_model("embedded:1.5b")[0] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert MC.hub_base_model("meta-llama/Meta-Llama-3-8B-Instruct") == ("meta-llama/Meta-Llama-3-8B-Instruct", None)
    assert MC.hub_base_model("/models/llama")[0] is None and MC.hub_base_model("./m.gguf")[0] is None


# ---------------------------------------------------------------------- push_to_hub
class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi; never touches the network."""

    calls: list[tuple[str, dict]] = []
    fail: Exception | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        FakeApi.calls.append(("create_repo", kwargs))
        if FakeApi.fail is not None:
            raise FakeApi.fail
        return type("RepoUrl", (), {"repo_id": kwargs["repo_id"]})()

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    return folder


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(fake_hub):
    url = MC.push_to_hub(fake_hub, "me/tiny-abliterated", token="hf_test")
    assert url == "https://huggingface.co/me/tiny-abliterated/commit/abc"
    assert FakeApi.calls[0] == ("init", {"token": "hf_test"})
    assert FakeApi.calls[1] == ("create_repo", {"repo_id": "me/tiny-abliterated", "repo_type": "model",
                                                "private": True, "exist_ok": True})
    name, upload = FakeApi.calls[2]
    assert name == "upload_folder" and upload["folder_path"] == str(fake_hub)
    assert upload["repo_id"] == "me/tiny-abliterated" and upload["repo_type"] == "model"
    MC.push_to_hub(fake_hub, "me/public", token="hf_test", private=False)
    assert FakeApi.calls[4][1]["private"] is False


def test_push_to_hub_uses_the_saved_token(fake_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    MC.push_to_hub(fake_hub, "me/x")
    assert FakeApi.calls[0] == ("init", {"token": "hf_saved"})


def test_push_to_hub_without_a_token(fake_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(MC.HubUploadError, match="no Hugging Face token.*hf auth login.*HF_TOKEN"):
        MC.push_to_hub(fake_hub, "me/x")
    assert FakeApi.calls == []  # nothing was attempted


def test_push_to_hub_offline_and_without_network(fake_hub, monkeypatch):
    import httpx2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MC.HubUploadError, match="HF_HUB_OFFLINE"):
        MC.push_to_hub(fake_hub, "me/x", token="hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    FakeApi.fail = httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(MC.HubUploadError, match="Cannot reach the Hugging Face Hub"):
        MC.push_to_hub(fake_hub, "me/x", token="hf_test")


def test_push_to_hub_refused_token(fake_hub):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    FakeApi.fail = HfHubHTTPError("401 Unauthorized", response=response)
    with pytest.raises(MC.HubUploadError, match="HTTP 401.*refused or lacks write access"):
        MC.push_to_hub(fake_hub, "me/x", token="hf_bad")
    with pytest.raises(MC.HubUploadError, match="No folder"):
        MC.push_to_hub(fake_hub / "missing", "me/x", token="hf_test")

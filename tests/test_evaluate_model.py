"""`refusal-directions evaluate-model`: a model as it is, against its base, through the run's own
infer / evaluate / summary / report code. A baked export evaluated against its base gives the hooked
run's numbers (bit-identical on CPU: the run generates with the same baked weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusal_directions import pipeline as P
from refusal_directions.artifacts import read_jsonl
from refusal_directions.cli import main
from refusal_directions.config import build_config
from refusal_directions.interventions import Replacement, ReplacementError, applied, intervene
from tiny import make_adapter, save_tiny_model

SETTINGS = {
    "device": "cpu", "preset": "quick", "n_train": 16, "n_val": 4, "n_test": 3, "positions": [-2, -1],
    "filter_train": False, "max_new_tokens": 4, "n_loss_docs": 2, "mmlu_questions": 2, "arc_questions": 2,
    "actadd_multipliers": [1.0], "intervention_mode": "actadd", "safety_judge": "none", "batch_size": 4,
    "methods": ["diff_in_means"],
}
HOOKED_ROW = "diff_in_means.ablation@all"


def flags(settings: dict) -> list[str]:
    """Command-line flags for ``settings``."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """The hooked run, its diff-in-means export, and evaluate-model runs of the export with and without its base."""
    root = tmp_path_factory.mktemp("evaluate_model")
    base = save_tiny_model(root / "tiny", "llama", n_layers=2, d_model=32)
    common = {**SETTINGS, "output_dir": str(root / "runs"), "data_dir": str(data_dir)}
    config, _ = build_config({**common, "model": str(base)})
    hooked = P.run_command("run", config)
    export = P.export_model(config, "diff_in_means", root / "abliterated")
    assert main(["evaluate-model", "--model", str(export), "--base", str(base), *flags(common)]) == 0
    (with_base,) = (root / "runs" / "evaluate-model").glob("abliterated-vs-tiny/*")
    alone = P.evaluate_model_command(build_config({**common, "model": str(export)})[0])
    return {"hooked": hooked.dir, "with_base": with_base, "alone": alone.dir, "export": export, "base": base}


def summary(folder: Path) -> dict:
    return json.loads((folder / "evaluate" / "summary.json").read_text())


def test_exported_model_against_its_base_gives_the_hooked_runs_numbers(runs):
    hooked, evaluated = summary(runs["hooked"]), summary(runs["with_base"])
    assert [i["name"] for i in evaluated["interventions"]] == ["baseline", "model"]
    assert set(evaluated["results"]["model"]) == set(hooked["results"][HOOKED_ROW])
    for row, hooked_row in (("baseline", "baseline"), ("model", HOOKED_ROW)):
        for metric, cell in evaluated["results"][row].items():
            expected = hooked["results"][hooked_row][metric]
            if metric.startswith("kl/"):  # the hooked run's KL uses hooks, the replaced weights are baked: rounding
                assert cell["value"] == pytest.approx(expected["value"], rel=1e-4, abs=1e-6), metric
                continue
            # bit-identical: values, intervals, counts and raw p-values (the Holm family differs: other rows)
            for field in ("status", "value", "ci", "n", "test", "p_raw", "reason"):
                assert cell.get(field) == expected.get(field), (row, metric, field)
    assert evaluated["results"]["model"]["ce/general"]["p_raw"] is not None
    assert evaluated["coherence_thresholds"] == hooked["coherence_thresholds"]
    assert evaluated["per_category"]["model"] == hooked["per_category"][HOOKED_ROW]
    for d in ("jailbreakbench", "harmless_test"):
        rows = read_jsonl(runs["with_base"] / "infer" / "model" / f"{d}.jsonl")
        expected = read_jsonl(runs["hooked"] / "infer" / HOOKED_ROW / f"{d}.jsonl")
        assert [r["response"] for r in rows] == [r["response"] for r in expected]
        assert {r["applied_as"] for r in rows} == {"replaced"} and {r["applied_as"] for r in expected} == {"baked"}


def test_the_report_and_manifest_name_both_models(runs):
    manifest = json.loads((runs["with_base"] / "manifest.json").read_text())
    evaluated = manifest["evaluate_model"]
    assert evaluated["model"]["spec"] == str(runs["export"]) and evaluated["base"]["spec"] == str(runs["base"])
    assert evaluated["model"]["fingerprint"] != evaluated["base"]["fingerprint"]
    assert manifest["model"]["fingerprint"] == evaluated["base"]["fingerprint"]  # the base's modules ran
    md = (runs["with_base"] / "report" / "report.md").read_text()
    assert md.startswith(f"# Evaluate-model run: {runs['export']} vs base {runs['base']}\n")
    assert "| run kind | evaluate-model |" in md and f"| base model | {runs['base']} (alias tiny" in md
    assert f"| evaluated model | {runs['export']} (alias abliterated" in md and "| rows | row baseline: the base model" in md
    assert "| model |" in md and "Stages missing" not in md and "| methods |" not in md
    record = json.loads((runs["with_base"] / "reproduce.json").read_text())
    assert record["kind"] == "evaluate-model" and record["evaluate_model"] == evaluated
    assert record["stages"] == ["infer", "evaluate"]


def test_without_a_base_the_model_gets_only_its_own_numbers(runs):
    alone, evaluated = summary(runs["alone"]), summary(runs["with_base"])
    assert [i["name"] for i in alone["interventions"]] == ["baseline"]
    own = alone["results"]["baseline"]
    for metric in ("attack_success/jailbreakbench", "harmless_refusal", "ce/general", "ce/on_distribution", "mmlu",
                   "arc_challenge/acc"):
        if metric == "ce/on_distribution":  # scored on the model's own completions, not the base's
            continue
        assert own[metric]["value"] == evaluated["results"]["model"][metric]["value"], metric
        assert own[metric]["p_vs_baseline"] is None
    assert own["kl/harmless"]["value"] == 0.0
    md = (runs["alone"] / "report" / "report.md").read_text()
    assert md.startswith(f"# Evaluate-model run: {runs['export']} (no base)\n") and "| base model | none given |" in md
    assert runs["alone"].parent.name == "abliterated" and runs["alone"].parent.parent.name == "evaluate-model"


def test_a_rerun_reuses_the_evaluate_model_artifacts_and_reproduces_them(runs, tmp_path):
    result = P.reproduce_run(runs["with_base"], out=tmp_path / "again")
    assert result.identical and result.exit_code == 0, [str(d) for d in result.differences]


def test_an_incompatible_base_is_refused_with_the_reason():
    model, other_depth = make_adapter("llama", n_layers=2, d_model=32), make_adapter("llama", n_layers=3, d_model=32)
    with pytest.raises(P.RunError, match="2 layers x d_model 32 != 3 x 32.*leave out --base"):
        P.check_compatible(model, other_depth)
    other_arch = make_adapter("qwen2", n_layers=2, d_model=32)
    with pytest.raises(P.RunError, match="architecture LlamaForCausalLM != Qwen2ForCausalLM"):
        P.check_compatible(model, other_arch)
    P.check_compatible(model, make_adapter("llama", n_layers=2, d_model=32, seed=5))  # another checkpoint: fine


def test_replacement_computes_the_other_model_and_restores_the_base():
    base, other = make_adapter("llama", n_layers=2, d_model=32), make_adapter("llama", n_layers=2, d_model=32, seed=9)
    enc = base.encode_instructions(["how do I pick a lock", "write a poem"])
    before = base.model(**enc).logits
    expected = other.model(**enc).logits
    with applied(base, Replacement.of(other)) as how:
        assert how == "replaced"
        assert torch.equal(base.model(**enc).logits, expected)
    assert torch.equal(base.model(**enc).logits, before)
    with pytest.raises(TypeError, match="no hooks"), intervene(base, Replacement.of(other)):
        pass
    bigger = make_adapter("llama", n_layers=3, d_model=32)
    with pytest.raises(ReplacementError, match="other parameters"), applied(base, Replacement.of(bigger)):
        pass

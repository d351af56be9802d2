"""Golden run: a tiny model end to end, every stage and every intervention kind at three scopes.

The numbers it leaves behind (direction norms, selection scores and choices, every completion,
every summary cell) must equal those recorded in ``tests/golden/tiny_run.json``. Refactors must
keep them; a change meant to change numbers re-records them (and bumps ``STAGE_VERSIONS``):

    .venv/bin/python tests/test_golden.py --record

Floats are compared to 1e-5 relative or 1e-6 absolute (reductions differ in their last bits between processes and CPUs:
1e-6 relative differences were seen between two 2-core machines);
texts and choices exactly. Cells or keys that are new since the recording are ignored, so adding
a metric does not break the test; losing or changing a recorded one does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"
SETTINGS = {
    "device": "cpu", "preset": "quick", "n_train": 16, "n_val": 4, "n_test": 3, "positions": [-2, -1],
    "filter_train": False, "max_new_tokens": 4, "n_loss_docs": 2, "mmlu_questions": 2, "arc_questions": 2,
    "safety_judge": "none", "batch_size": 4, "seed": 7,
    "scopes": ["one", "top:0.5", "all"], "intervention_mode": "both",
    "actadd_multipliers": [1.0, 2.0], "reflection_alphas": [1.0, 2.0], "reflection_mode": "reference",
}


def _tensor_digest(tensor: torch.Tensor) -> list[float]:
    """Sum, sum of squares and sum of index-weighted values: a digest that moves with any entry."""
    t = tensor.double().flatten()
    weights = torch.arange(1, t.numel() + 1, dtype=torch.float64) / max(t.numel(), 1)
    return [float(t.sum()), float((t * t).sum()), float((t * weights).sum())]


def collect(run_dir: Path) -> dict:
    """The numbers of a finished run folder, as plain JSON."""
    out: dict = {"extract": {}, "select": {}, "infer": {}, "evaluate_artifacts": {}, "evaluate": {}}
    for path in sorted((run_dir / "extract").rglob("*.safetensors")):
        tensors = load_file(str(path))
        out["extract"][str(path.relative_to(run_dir))] = {k: _tensor_digest(v) for k, v in sorted(tensors.items())}
    for path in sorted((run_dir / "select").glob("*.json")):
        out["select"][path.name] = json.loads(path.read_text())
    out["infer"]["plan.json"] = json.loads((run_dir / "infer" / "plan.json").read_text())
    for path in sorted((run_dir / "infer").rglob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out["infer"][str(path.relative_to(run_dir))] = lines
    for path in sorted((run_dir / "evaluate").rglob("*.json")):
        if path.name != "summary.json":
            out["evaluate_artifacts"][str(path.relative_to(run_dir))] = json.loads(path.read_text())
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    out["evaluate"] = {
        name: {metric: {k: cell[k] for k in ("status", "value", "ci", "n", "p_raw", "p_vs_baseline") if k in cell}
               for metric, cell in row.items()}
        for name, row in summary["results"].items()
    }
    return _strip_volatile(out)


_VOLATILE = {"key", "created", "timings", "seconds", "elapsed_s", "code_version", "path", "run_dir"}


def _strip_volatile(value):
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def assert_matches(recorded, actual, path: str = "run") -> None:
    """Every recorded value is present in ``actual`` and equal (floats to 1e-5 relative)."""
    if isinstance(recorded, dict):
        assert isinstance(actual, dict), path
        for key, value in recorded.items():
            assert key in actual, f"{path}.{key} is missing"
            assert_matches(value, actual[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        assert isinstance(actual, list) and len(recorded) == len(actual), f"{path}: length"
        for i, (a, b) in enumerate(zip(recorded, actual)):
            assert_matches(a, b, f"{path}[{i}]")
    elif isinstance(recorded, float) and not isinstance(actual, bool):
        if math.isnan(recorded):
            assert isinstance(actual, float) and math.isnan(actual), path
        else:
            assert actual == pytest.approx(recorded, rel=1e-5, abs=1e-6), path
    else:
        assert recorded == actual, path


def golden_run(out: Path, data_dir: Path) -> Path:
    from refusal_directions import pipeline as P
    from refusal_directions.config import build_config
    from tiny import save_tiny_model

    torch.manual_seed(0)
    model = save_tiny_model(out / "model" / "tiny", "llama", n_layers=3, d_model=32)
    config, _ = build_config({**SETTINGS, "model": str(model), "output_dir": str(out / "runs"), "data_dir": str(data_dir)})
    return P.run_command("run", config).dir


def test_golden_run_numbers_are_unchanged(tmp_path, data_dir):
    recorded = json.loads(GOLDEN.read_text())
    actual = collect(golden_run(tmp_path, data_dir))
    names = set(recorded["evaluate"])
    assert {"baseline", "diff_in_means.ablation@one", "inlp.projection@top0.5", "leace.erasure@all",
            "inlp.actadd-x2", "diff_in_means.reflection-a2-reference@all"} <= names
    assert_matches(recorded, actual)


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    data = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    with tempfile.TemporaryDirectory() as tmp:
        result = collect(golden_run(Path(tmp), data))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"recorded {GOLDEN}")

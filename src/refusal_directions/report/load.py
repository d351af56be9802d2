"""Loading a run folder's report inputs, and reading ``evaluate/summary.json``.

Owns ``RunArtifacts`` and ``load_run`` (``manifest.json``, ``extract/geometry.json``,
``select/<method>.json``, ``sweep/<method>.json``, ``optimize/<method>.json``, ``infer/plan.json``,
``evaluate/intervention_geometry.json``, ``evaluate/summary.json``; whatever is missing or stale
becomes a note, never an error) and the accessors every page uses to walk a summary in report order
(``ordered_metrics``, ``intervention_names``, ``metric_label``, ``summary_cell``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import read_json
from ..selection import MethodSelection

METHOD_ORDER = ("diff_in_means", "inlp", "leace")
METHOD_LABELS = {"diff_in_means": "diff-in-means", "inlp": "INLP", "leace": "LEACE"}
GROUP_ORDER = ("refusal", "safety", "capability")
STAGES = ("extract", "select", "infer", "evaluate")


@dataclass
class RunArtifacts:
    """What a run folder holds (each piece None / empty when missing)."""

    dir: Path
    manifest: dict | None = None
    geometry: dict | None = None
    intervention_geometry: dict | None = None
    selections: dict[str, MethodSelection] = field(default_factory=dict)
    selection_raw: dict[str, dict] = field(default_factory=dict)
    plan: list[dict] | None = None
    summary: dict | None = None
    sweeps: dict[str, dict] = field(default_factory=dict)  # method -> sweep/<method>.json
    searches: dict[str, dict] = field(default_factory=dict)  # method -> optimize/<method>.json
    stages: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        """The run configuration recorded in the manifest ({} without one)."""
        return (self.manifest or {}).get("config") or {}

    @property
    def model(self) -> dict:
        """The model description recorded in the manifest ({} without one)."""
        return (self.manifest or {}).get("model") or {}

    @property
    def evaluate_model(self) -> dict | None:
        """The evaluate-model record of the manifest (the evaluated model and its base); None for a run."""
        return (self.manifest or {}).get("evaluate_model") or None

    @property
    def missing_stages(self) -> list[str]:
        """Stages whose artifacts the folder lacks, in run order."""
        return [s for s in STAGES if not self.stages.get(s)]


def load_json_or_note(path: Path, notes: list[str]) -> Any | None:
    """The JSON at ``path``; None when absent, or unreadable (then a note says so)."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} is unreadable ({err}); it is left out.")
        return None


def _check_key(artifacts: RunArtifacts, data: Any, stage: str, label: str) -> None:
    """Note an artifact whose stage key is not the manifest's (it may be stale)."""
    expected = ((artifacts.manifest or {}).get("stage_keys") or {}).get(stage)
    key = data.get("key") if isinstance(data, dict) else None
    if expected and key and key != expected:
        artifacts.notes.append(f"{label} was made with another configuration (key {key}, this run's {stage} key {expected}): "
                               "it may be stale; rerun that stage.")


def load_run(run_dir: Path) -> RunArtifacts:
    """Read every report input of a run folder that exists; note what is missing or unreadable."""
    run_dir = Path(run_dir)
    art = RunArtifacts(run_dir)
    art.manifest = load_json_or_note(run_dir / "manifest.json", art.notes)
    if art.manifest is None:
        art.notes.append("manifest.json is missing: model and configuration are unknown.")
    art.geometry = load_json_or_note(run_dir / "extract" / "geometry.json", art.notes)
    if art.geometry is not None:
        _check_key(art, art.geometry, "extract", "extract/geometry.json")
    art.stages["extract"] = art.geometry is not None or (run_dir / "extract" / "prompts.json").exists()
    methods = list(art.config.get("methods") or [])
    found = sorted((p.stem for p in (run_dir / "select").glob("*.json")), key=_method_sort_key)
    for method in [*[m for m in methods if m in found], *[m for m in found if m not in methods]]:
        raw = load_json_or_note(run_dir / "select" / f"{method}.json", art.notes)
        if not isinstance(raw, dict):
            continue
        try:
            art.selections[method] = MethodSelection.from_dict(raw)
            art.selection_raw[method] = raw
            _check_key(art, raw, "select", f"select/{method}.json")
        except (KeyError, TypeError, StopIteration) as err:
            art.notes.append(f"select/{method}.json has an unexpected format ({err!r}); it is left out.")
    art.stages["select"] = bool(art.selections)
    for folder, into in (("sweep", art.sweeps), ("optimize", art.searches)):
        for path in sorted((run_dir / folder).glob("*.json"), key=lambda p: _method_sort_key(p.stem)):
            doc = load_json_or_note(path, art.notes)
            if isinstance(doc, dict) and isinstance(doc.get("records" if folder == "sweep" else "trials"), list):
                into[path.stem] = doc
    plan = load_json_or_note(run_dir / "infer" / "plan.json", art.notes)
    if isinstance(plan, dict):
        art.plan = list(plan.get("interventions") or [])
        _check_key(art, plan, "infer", "infer/plan.json")
    art.stages["infer"] = art.plan is not None
    moved = load_json_or_note(run_dir / "evaluate" / "intervention_geometry.json", art.notes)
    if isinstance(moved, dict):
        art.intervention_geometry = moved
        _check_key(art, moved, "select", "evaluate/intervention_geometry.json")
    summary = load_json_or_note(run_dir / "evaluate" / "summary.json", art.notes)
    if isinstance(summary, dict):
        art.summary = summary
        _check_key(art, summary, "evaluate", "evaluate/summary.json")
    art.stages["evaluate"] = art.summary is not None
    return art


def _method_sort_key(method: str) -> tuple[int, str]:
    """Known methods in METHOD_ORDER, then the others by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def ordered_metrics(summary: dict) -> list[str]:
    """Metric ids, grouped refusal, safety, capability (summary order within a group)."""
    metrics = summary.get("metrics") or {}

    def group_rank(mid: str) -> int:
        group = (metrics.get(mid) or {}).get("group")
        return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)

    return sorted(metrics, key=group_rank)


def intervention_names(summary: dict) -> list[str]:
    """Interventions in summary order (baseline first), plus any only present in ``results``."""
    names = [spec.get("name") for spec in summary.get("interventions") or [] if spec.get("name")]
    names += [n for n in (summary.get("results") or {}) if n not in names]
    if "baseline" in names:
        names.remove("baseline")
        names.insert(0, "baseline")
    return names


def metric_label(summary: dict, metric_id: str) -> str:
    """The metric's label from the summary (its id when it has none)."""
    meta = (summary.get("metrics") or {}).get(metric_id) or {}
    return str(meta.get("label") or metric_id)


def better_arrow(summary: dict, metric_id: str) -> str:
    """" ↓" (lower is better), " ↑" (higher is better) or ""."""
    better = ((summary.get("metrics") or {}).get(metric_id) or {}).get("better")
    return {"lower": " ↓", "higher": " ↑"}.get(better, "")


def summary_cell(summary: dict, name: str, metric_id: str) -> dict | None:
    """The summary cell of one intervention and metric (None when absent)."""
    return ((summary.get("results") or {}).get(name) or {}).get(metric_id)


def harmful_datasets(art: RunArtifacts) -> list[str]:
    """Harmful evaluation sets: from the config, else from the attack-success metric ids."""
    datasets = list(art.config.get("eval_datasets") or [])
    for mid in (art.summary or {}).get("metrics") or {}:
        if mid.startswith("attack_success/") and mid.split("/", 1)[1] not in datasets:
            datasets.append(mid.split("/", 1)[1])
    return datasets

"""Reproduce a run: rerun it from its ``reproduce.json`` into a fresh folder and compare the artifacts.

The run store writes ``reproduce.json`` into every run folder (``store.reproduce_record``). From it,
``reproduce_run`` rebuilds the configuration (every setting as recorded), reruns the stages whose
artifacts the folder holds (a run, or an evaluate-model run) into a new folder, and lists every
difference between the two folders' artifacts (``diff.diff_runs``: directions, selection,
completions, per-item metrics and the summary, compared exactly). On the same CPU and libraries a
rerun is bit-identical, so any difference is reported, never rounded away.

What would explain a difference is checked before rerunning and reported as a warning: another
package or stage code version, other library versions, other data (content hashes of the files
read), another model (fingerprint) or another number of CPU threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import read_json
from ..config import STAGE_VERSIONS, STAGES, ConfigError, RunConfig, field_names
from ..models import ModelAdapter, load_model
from .diff import Difference, diff_runs
from .store import REPRODUCE_FILE, REPRODUCE_FORMAT, Run, RunError, library_versions

log = logging.getLogger(__name__)

DIFFERENT = 3  # the command's exit status when the rerun's artifacts differ
IDENTICAL = 0
STAGE_CONTROL = ("extract_only", "select_only", "infer_only", "use_existing", "resume_from_eval", "skip_eval",
                 "force_overwrite")


@dataclass
class Reproduction:
    """The outcome of ``reproduce_run``: the new folder, the differences of its artifacts from the
    original's, and the warnings about what differs from the record (versions, data, model)."""

    original: Path
    rerun: Path
    differences: list[Difference]
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    @property
    def exit_code(self) -> int:
        """``IDENTICAL`` (0) or ``DIFFERENT`` (3)."""
        return IDENTICAL if self.identical else DIFFERENT


def read_record(run_dir: Path) -> dict:
    """The ``reproduce.json`` of ``run_dir``; ``RunError`` if it is missing, unreadable or of an unknown format."""
    path = Path(run_dir) / REPRODUCE_FILE
    if not path.exists():
        raise RunError(f"{path} does not exist: {run_dir} is not a run folder, or was made before reproduce records "
                       "existed (rerun it with the same settings to get one).")
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} is unreadable: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != REPRODUCE_FORMAT:
        raise RunError(f"{path} has format {record.get('format') if isinstance(record, dict) else '?'}; "
                       f"this version ({__version__}) reads format {REPRODUCE_FORMAT}.")
    return record


def config_from_record(record: dict, data_dir: str | None = None) -> RunConfig:
    """The recorded settings as a ``RunConfig``, with the stage-control flags set to rerun exactly
    the recorded stages from scratch (``data_dir``: where the mirror is now, if it moved)."""
    values = dict(record.get("config") or {})
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise RunError(f"The record has settings this version does not know: {unknown}; reproduce it with the "
                       f"package version that made it ({record.get('package_version')}).")
    values.update({flag: False for flag in STAGE_CONTROL})
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    stages = [s for s in record.get("stages") or [] if s in STAGES]
    if stages and stages[-1] != "evaluate":
        values[f"{stages[-1]}_only"] = True  # stop where the original stopped (an evaluate-model run: infer_only)
    try:
        return RunConfig(**values).validate()
    except (ConfigError, TypeError) as exc:
        raise RunError(f"The recorded settings are not valid here: {exc}") from None


def environment_warnings(record: dict, config: RunConfig) -> list[str]:
    """What differs between the record and this environment, each a sentence: package and stage
    code versions, library versions, data content hashes, CPU threads."""
    warnings = []
    if record.get("package_version") != __version__:
        warnings.append(f"package version {record.get('package_version')} recorded, {__version__} installed.")
    if record.get("stage_versions") != STAGE_VERSIONS:
        warnings.append(f"stage code versions {record.get('stage_versions')} recorded, {STAGE_VERSIONS} now: "
                        "the stages whose version changed compute other numbers by design.")
    recorded, current = record.get("libraries") or {}, library_versions()
    changed = [f"{k} {recorded.get(k, 'not recorded')} -> {current.get(k, 'not installed')}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if changed:
        warnings.append("library versions differ from the record: " + ", ".join(changed) + ".")
    data, now = record.get("data") or {}, config.data_identity()
    moved = [name for name in sorted(set(data) | set(now)) if data.get(name) != now.get(name)]
    if moved:
        warnings.append("the data differs from the record (content hash or source): " + ", ".join(
            f"{n} ({_data_text(data.get(n))} recorded, {_data_text(now.get(n))} now)" for n in moved) + ".")
    threads = record.get("torch_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.append(f"{threads} CPU threads recorded, {torch.get_num_threads()} now: CPU reductions may differ "
                        "in their last bits.")
    return warnings


def _data_text(identity: dict | None) -> str:
    if not identity:
        return "none"
    if "sha256" in identity:
        return f"{identity['source']} sha256 {identity['sha256'][:12]}"
    return ", ".join(f"{k} {v}" for k, v in identity.items())


def fresh_folder(original: Path, out: Path | None) -> Path:
    """The rerun's folder: ``out`` (which must be absent or empty), else ``<original>-reproduce[-N]``."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunError(f"{out} exists and is not an empty folder; give a fresh --out.")
        if out.resolve() == Path(original).resolve():
            raise RunError("--out must not be the original run folder.")
        return out
    candidate, n = Path(f"{original}-reproduce"), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{original}-reproduce-{n}")
    return candidate


def load_recorded_model(record: dict, spec: str, config: RunConfig) -> ModelAdapter:
    """Load a recorded model: from ``spec`` as given, else (a relative path run elsewhere) from the
    absolute path recorded beside it."""
    model = record.get("model") or {}
    path = model.get("path") if spec == config.model else None
    if path and not Path(spec).expanduser().exists() and Path(path).exists():
        spec = path
    return load_model(spec, device=config.device, dtype=config.dtype, chat_template=config.chat_template)


def reproduce_run(run_dir: Path, out: Path | None = None, data_dir: str | None = None) -> Reproduction:
    """Rerun the run of ``run_dir`` from its ``reproduce.json`` into a fresh folder and compare every
    artifact (``Reproduction.differences``; empty when bit-identical)."""
    from .commands import run_command
    from .evaluate_model import evaluate_model_command

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    config = config_from_record(record, data_dir)
    warnings = environment_warnings(record, config)
    for warning in warnings:
        log.warning("reproduce: %s", warning)
    folder = fresh_folder(run_dir, out)
    if record.get("kind") == "evaluate-model":
        model = load_recorded_model(record, config.model, config)
        base = load_model(config.base, device=config.device, dtype=config.dtype, chat_template=config.chat_template) \
            if config.base else None
        run = evaluate_model_command(config, run_dir=folder, adapters=(model, base))
    else:
        run = run_command("run", config, run_dir=folder, adapter=load_recorded_model(record, config.model, config))
    warnings += _model_warnings(record, run)
    return Reproduction(run_dir, folder, diff_runs(run_dir, folder), warnings)


def _model_warnings(record: dict, run: Run) -> list[str]:
    """A warning when the rerun's model (or model pair) is not the recorded one."""
    recorded = (record.get("model") or {}).get("identity")
    now = run.identity or run.model_info.get("fingerprint")
    if recorded and recorded != now:
        return [f"the model differs from the record (identity {recorded} recorded, {now} now): another checkpoint "
                "under the same name?"]
    return []


"""The run store: the run folder, its stage keys, the manifest, and whether an artifact is valid.

A run folder is ``<output_dir>/<model-alias>/<key>/`` where ``key`` hashes the model fingerprint
and every setting that changes the directions and the selection (``RunConfig.stage_key("select")``).
Every artifact records the key of the stage that made it (``Run.stage_key``); an artifact is
*valid* when it exists, reads whole, and carries the current key of its stage. Writers are atomic
(``artifacts``), so a killed process leaves each file whole or absent, and a rerun recomputes
exactly what is missing or stale. This module owns those rules, the manifest and the reproduce
record (``reproduce.json``: what ``pipeline.reproduce`` needs to rerun the run); it knows no stage.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__
from ..artifacts import read_json, read_jsonl, safetensors_metadata, write_json
from ..config import STAGE_VERSIONS, STAGES, RunConfig
from ..models import ModelAdapter, load_model

log = logging.getLogger(__name__)

MODEL_INFO_FIELDS = ("name", "alias", "fingerprint", "n_layers", "d_model", "dtype", "device")
REPRODUCE_FILE = "reproduce.json"
REPRODUCE_FORMAT = 1
# the distributions whose versions can change a run's numbers (recorded in reproduce.json)
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "scipy",
             "concept-erasure", "peft", "gguf")


# The code versions of the stages outside the extract -> evaluate chain (part of their keys, ``side_stage_key``).
SIDE_STAGE_VERSIONS: dict[str, int] = {"sweep": 1, "optimize": 1}


class RunError(RuntimeError):
    """A run cannot proceed; the message says why and what to do."""


@dataclass
class Run:
    """One run: its configuration, model and folder.

    ``key``: the run folder's key (the select stage's key). ``timings``: seconds per stage that
    wrote artifacts in this process. ``model_info``: the manifest's model description, kept when
    the model is freed (before a safety judge is loaded). ``identity``: what the stage keys hash
    instead of the adapter's fingerprint (an evaluate-model run: both models' fingerprints);
    ``evaluate_model``: that run's description (``{"model": ..., "base": ... or None}``), else None.
    ``scratch``: in-memory values shared between metrics of this process (the baseline logits the
    KL of every intervention compares with), never written.
    """

    config: RunConfig
    adapter: ModelAdapter
    dir: Path
    key: str
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    identity: str | None = None
    evaluate_model: dict | None = None
    scratch: dict = field(default_factory=dict)  # in-memory results shared by metrics within one process

    def path(self, *parts: str) -> Path:
        """A path inside the run folder."""
        return self.dir.joinpath(*parts)

    def stage_key(self, stage: str) -> str:
        """The key every artifact of ``stage`` must carry to be reused."""
        return self.config.stage_key(stage, self.identity or self.adapter.fingerprint)

    def side_stage_key(self, stage: str, settings: dict[str, Any]) -> str:
        """The key of a stage outside the chain (``sweep``, ``optimize``: they read the selection and
        feed only the report, or the plan through ``optimize``): a hash of the select key (model,
        data, directions and selection settings), the stage's own ``settings`` and its code version."""
        payload = json.dumps({"select": self.stage_key("select"), "stage": stage, "settings": settings,
                              "version": SIDE_STAGE_VERSIONS[stage]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def batch_size(self) -> int:
        """Prompts per forward pass: the configured size, else 64 on GPU and 16 on CPU."""
        if self.config.batch_size:
            return self.config.batch_size
        return 64 if self.adapter.input_device.type == "cuda" else 16


def open_run(config: RunConfig, adapter: ModelAdapter | None = None, run_dir: Path | None = None,
             identity: str | None = None, evaluate_model: dict | None = None) -> Run:
    """Load the model (unless given) and open (or create) the run folder for ``config``.

    ``identity`` replaces the model fingerprint in every stage key and ``evaluate_model`` describes
    an evaluate-model run (see ``Run``); both None for a run of the pipeline. A folder whose manifest
    belongs to another model or configuration is refused, unless ``force_overwrite`` is set.
    Attaches ``run.log`` and writes the manifest and ``reproduce.json``.
    """
    if adapter is None:
        adapter = load_model(config.model, device=config.device, dtype=config.dtype, chat_template=config.chat_template)
    key = config.stage_key("select", identity or adapter.fingerprint)
    folder = Path(run_dir) if run_dir is not None else Path(config.output_dir) / adapter.alias / key
    if not config.force_overwrite:
        _check_folder_owner(folder, adapter, key)
    folder.mkdir(parents=True, exist_ok=True)
    described = adapter.describe()
    run = Run(config, adapter, folder, key, model_info={k: described[k] for k in MODEL_INFO_FIELDS},
              identity=identity, evaluate_model=evaluate_model)
    _attach_log_file(folder / "run.log")
    write_manifest(run)
    return run


def _check_folder_owner(folder: Path, adapter: ModelAdapter, key: str) -> None:
    """Raise ``RunError`` if ``folder`` holds a run of another model or another configuration."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return
    manifest = read_json(manifest_path)
    model = manifest.get("model", {})
    if model.get("fingerprint") != adapter.fingerprint:
        raise RunError(
            f"{folder} holds a run of another model ({model.get('name')}, fingerprint "
            f"{model.get('fingerprint')}); choose another folder or pass --force-overwrite."
        )
    if manifest.get("key") != key:
        raise RunError(
            f"{folder} holds a run with another configuration (key {manifest.get('key')}, this one {key}); "
            "choose another folder or pass --force-overwrite."
        )


def _attach_log_file(path: Path) -> None:
    """Send the package's INFO log to ``path`` (one run log at a time)."""
    root = logging.getLogger("refusal_directions")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


def write_manifest(run: Run) -> None:
    """Write ``manifest.json``: config, model, stage keys and versions, data identity, timings
    (merged with those already recorded, so a rerun that reuses a stage keeps its time); and
    ``reproduce.json`` (``reproduce_record``)."""
    path = run.path("manifest.json")
    old = read_json(path) if path.exists() else {}
    timings = {**old.get("timings", {}), **run.timings}
    data = run.config.data_identity()  # source and content hash of every dataset the stages read
    manifest = {
        "key": run.key,
        "config": run.config.to_dict(),
        "model": run.model_info,
        "stage_keys": {s: run.stage_key(s) for s in STAGES},
        "stage_versions": dict(STAGE_VERSIONS),
        "data": data,
        "package_version": __version__,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "seed": run.config.seed,
        "timings": timings,
    }
    if run.evaluate_model is not None:
        manifest["evaluate_model"] = run.evaluate_model
    write_json(path, manifest)
    write_json(run.path(REPRODUCE_FILE), reproduce_record(run, data))


def library_versions() -> dict[str, str]:
    """The installed version of every distribution in ``LIBRARIES`` ("not installed" where absent),
    and Python's."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def reproduce_record(run: Run, data: dict | None = None) -> dict:
    """The ``reproduce.json`` document: everything a rerun needs and everything that, if it changed,
    explains different numbers.

    ``kind`` ("run" or "evaluate-model", with ``evaluate_model``: the model and the base), the
    package and stage code versions, every setting (``config``), the model (the spec as given, its
    absolute path when it is a local file or folder, and its fingerprint), the content hashes of the
    data files read (``data``, as ``RunConfig.data_identity``), library versions, the seed and the
    CPU threads (CPU reductions may depend on them), and the stages whose artifacts the folder holds.
    """
    config = run.config
    spec = Path(config.model).expanduser()
    record = {
        "format": REPRODUCE_FORMAT,
        "kind": "evaluate-model" if run.evaluate_model is not None else "run",
        "package_version": __version__,
        "stage_versions": dict(STAGE_VERSIONS),
        "config": config.to_dict(),
        "model": {"spec": config.model, "path": str(spec.resolve()) if spec.exists() else None,
                  "fingerprint": run.model_info.get("fingerprint"), "identity": run.identity or run.model_info.get("fingerprint"),
                  "info": run.model_info},
        "data": data if data is not None else config.data_identity(),
        "libraries": library_versions(),
        "platform": platform.platform(),
        "seeds": {"seed": config.seed},
        "torch_threads": torch.get_num_threads(),
        "stages": [s for s in STAGES if run.path(s).is_dir() and any(run.path(s).iterdir())],
    }
    if run.evaluate_model is not None:
        record["evaluate_model"] = run.evaluate_model
    return record


@contextmanager
def timed(run: Run, stage: str) -> Iterator[None]:
    """Log the stage's duration; record it in the manifest only if the stage wrote an artifact
    (a rerun that reuses everything keeps the time it took to compute them)."""
    start, wall = time.perf_counter(), time.time()
    log.info("%s: started", stage)
    yield
    seconds = round(time.perf_counter() - start, 2)
    folder = run.path(stage)
    if folder.exists() and any(p.stat().st_mtime >= wall for p in folder.rglob("*") if p.is_file()):
        run.timings[stage] = seconds
        log.info("%s: done in %.1f s", stage, seconds)
    else:
        log.info("%s: every artifact reused (%.1f s)", stage, seconds)
    write_manifest(run)


# ---------------------------------------------------------------------- artifact validity
def valid_json(path: Path, key: str) -> Any | None:
    """The JSON artifact at ``path`` if it exists, reads whole and was made with ``key``; else None."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        log.warning("%s is unreadable; recomputing it.", path)
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def valid_safetensors(path: Path, key: str) -> bool:
    """Whether the safetensors artifact at ``path`` exists and its metadata records ``key``."""
    try:
        return path.exists() and safetensors_metadata(path).get("key") == key
    except Exception:  # a truncated or foreign file: recompute
        log.warning("%s is unreadable; recomputing it.", path)
        return False


def valid_jsonl(path: Path, key: str, n: int) -> bool:
    """Whether the JSON-lines artifact at ``path`` holds exactly ``n`` rows, each made with ``key``."""
    if not path.exists():
        return False
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        return False
    return len(rows) == n and all(r.get("key") == key for r in rows)

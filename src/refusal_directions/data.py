"""Named datasets: one registry, loaded from a local mirror or from their public source.

Every set is loadable from its hub id or URL (for real users), or from a local mirror folder
(``--data-dir`` or ``$REFUSAL_DIRECTIONS_DATA``) laid out like ``shared/datasets``. When a data
directory is set, the mirror is used and a missing file is an error naming it; otherwise the
public source is used.

Record shapes by kind:
  instructions: {"instruction": str, "category": str | None}
  mmlu:         {"subject": str, "question": str, "choices": [4 str], "answer": int}
  arc:          {"id": str, "question": str, "choices": [str], "labels": [str], "answer": int}
  text:         {"text": str}
  alpaca:       {"instruction": str, "input": str, "output": str}
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

log = logging.getLogger(__name__)

DATA_ENV = "REFUSAL_DIRECTIONS_DATA"
_REFUSAL_REPO = "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset"

Kind = Literal["instructions", "mmlu", "arc", "text", "alpaca"]


class DataError(ValueError):
    """A dataset could not be loaded; the message names the file or set and the fix."""


class DatasetUnavailable(DataError):
    """The set has no copy in the local mirror (e.g. the Pile offline)."""


@dataclass(frozen=True)
class DatasetSpec:
    """One named set.

    ``local``: path under the mirror (None: not mirrored). ``hub``: a hub id, or a URL to a JSON
    file. ``hub_config`` / ``hub_split``: arguments of ``datasets.load_dataset``; ``{split}`` in
    ``local`` or ``hub_split`` is replaced by the requested split.
    """

    name: str
    kind: Kind
    local: str | None
    hub: str
    hub_config: str | None = None
    hub_split: str | None = None
    splits: tuple[str, ...] = ()
    description: str = ""


def _refusal_split(harm: str, split: str) -> DatasetSpec:
    return DatasetSpec(
        name=f"{harm}_{split}",
        kind="instructions",
        local=f"refusal/splits/{harm}_{split}.json",
        hub=f"{_REFUSAL_REPO}/splits/{harm}_{split}.json",
        description=f"{harm} {split} split of Arditi et al. (2024)",
    )


def _processed(name: str, description: str, hub: str | None = None, **hub_args: Any) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        kind="instructions",
        local=f"refusal/processed/{name}.json",
        hub=hub or f"{_REFUSAL_REPO}/processed/{name}.json",
        description=description,
        **hub_args,
    )


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        *(_refusal_split(h, s) for h in ("harmful", "harmless") for s in ("train", "val", "test")),
        _processed(
            "jailbreakbench",
            "JailbreakBench harmful behaviors (100, 10 categories)",
            hub="JailbreakBench/JBB-Behaviors",
            hub_config="behaviors",
            hub_split="harmful",
        ),
        _processed("advbench", "AdvBench harmful behaviors (520)"),
        _processed("harmbench_val", "HarmBench validation behaviors (41)"),
        _processed("harmbench_test", "HarmBench test behaviors (159)"),
        _processed("strongreject", "StrongREJECT forbidden prompts (313)"),
        _processed("malicious_instruct", "MaliciousInstruct (100)"),
        _processed("tdc2023", "TDC 2023 red-teaming behaviors (100)"),
        _processed("alpaca", "Alpaca instructions (harmless test prompts)"),
        DatasetSpec(
            "mmlu", "mmlu", "mmlu/{split}", "cais/mmlu", "all", "{split}", ("test", "dev"),
            "MMLU, 57 subjects (dev split = few-shot examples)",
        ),
        DatasetSpec(
            "arc_challenge", "arc", "arc_challenge/{split}.jsonl", "allenai/ai2_arc", "ARC-Challenge",
            "{split}", ("test", "train"), "ARC-Challenge (train split = few-shot examples)",
        ),
        DatasetSpec(
            "pile", "text", None, "monology/pile-uncopyrighted", None, "train", (),
            "The Pile (uncopyrighted), streamed: general-text cross-entropy",
        ),
        DatasetSpec(
            "lambada", "text", "general_text/lambada_openai.jsonl", "EleutherAI/lambada_openai", "default",
            "test", (), "LAMBADA (OpenAI) book passages: offline general-text corpus",
        ),
        DatasetSpec(
            "alpaca_outputs", "alpaca", None, "tatsu-lab/alpaca", None, "train", (),
            "Alpaca instructions with reference outputs (cross-entropy on the outputs)",
        ),
    ]
}


def data_dir_from_env() -> Path | None:
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def data_root(data_dir: str | Path | None) -> Path | None:
    """The mirror ``load_dataset`` reads: ``data_dir``, else ``$REFUSAL_DIRECTIONS_DATA``; None: the hub."""
    return Path(data_dir).expanduser() if data_dir is not None else data_dir_from_env()


# ------------------------------------------------------------------ data identity (artifact keys)
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process for each (path, mtime, size)."""
    stat = path.stat()
    cache_key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[cache_key] = digest.hexdigest()
    return _HASHES[cache_key]


def _local_files(spec: DatasetSpec, path: Path, split: str | None) -> list[Path]:
    """The files ``_load_local`` reads for ``spec`` at ``path`` (an MMLU split is a folder of CSVs)."""
    if spec.kind == "mmlu":
        return sorted(path.glob(f"*_{split or 'test'}.csv"))
    return [path] if path.is_file() else []


def _files_digest(files: Sequence[Path]) -> str:
    """One hash of several files' names and contents (names matter: MMLU subjects come from them)."""
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def dataset_identity(name: str, data_dir: str | Path | None = None, *, split: str | None = None) -> dict[str, Any]:
    """What ``load_dataset(name, data_dir, split=split)`` reads, independent of where a mirror lies.

    A local mirror: ``{"source": "mirror", "sha256": <hash of the files read>}``; a ``.json`` /
    ``.jsonl`` path: ``{"source": "file", "sha256": ...}``; the public source: ``{"source": "hub",
    "hub": <id or URL>, "config": ..., "split": ...}`` (the hub revision is not pinned: the latest is
    read). A file that is missing gets ``"missing"`` instead of ``"sha256"``: loading it raises.
    """
    if name.endswith((".json", ".jsonl")) and name not in REGISTRY:
        path = Path(name).expanduser()
        return {"source": "file", **({"sha256": file_sha256(path)} if path.is_file() else {"missing": name})}
    spec = REGISTRY.get(name)
    if spec is None:
        return {"source": "unknown", "name": name}
    split = split or (spec.splits[0] if spec.splits else None)
    root = data_root(data_dir)
    if root is None:
        hub_split = (spec.hub_split or "train").format(split=split) if not spec.hub.startswith("https://") else None
        return {"source": "hub", "hub": spec.hub, "config": spec.hub_config, "split": hub_split}
    if spec.local is None:
        return {"source": "mirror", "missing": "not mirrored"}
    relative = spec.local.format(split=split)
    files = _local_files(spec, root / relative, split)
    return {"source": "mirror", **({"sha256": _files_digest(files)} if files else {"missing": relative})}


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Load a named set (see ``REGISTRY``) or a local ``.json``/``.jsonl`` file path.

    ``data_dir`` defaults to ``$REFUSAL_DIRECTIONS_DATA``; when neither is set the public source
    is used. ``limit`` keeps the first records (useful for streamed corpora such as the Pile).
    Raises ``DataError`` (or ``DatasetUnavailable``) with the file and the fix.
    """
    if name.endswith((".json", ".jsonl")) and name not in REGISTRY:
        records = _read_json_records(Path(name).expanduser())
        return _check_nonempty(records[:limit] if limit else records, name)
    if name not in REGISTRY:
        raise DataError(f"Unknown dataset {name!r}. Known sets: {', '.join(sorted(REGISTRY))}; or give a .json/.jsonl path.")
    spec = REGISTRY[name]
    if spec.splits:
        split = split or spec.splits[0]
        if split not in spec.splits:
            raise DataError(f"{name} has splits {spec.splits}, not {split!r}.")
    root = data_root(data_dir)
    if root is not None:
        if spec.local is None:
            raise DatasetUnavailable(
                f"{name} ({spec.hub}) is not in the local mirror {root}; it loads from the hub when no "
                "data directory is set, or use a local corpus instead."
            )
        records = _load_local(spec, root / spec.local.format(split=split), split)
        source = str(root / spec.local.format(split=split))
    else:
        records = _load_hub(spec, split, limit)
        source = spec.hub
    if limit:
        records = records[:limit]
    log.debug("Loaded %d records of %s from %s", len(records), name, source)
    return _check_nonempty(records, source)


def sample(items: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """``n`` items drawn without replacement with a fixed seed (all of them, in order, if n is None)."""
    if n is None:
        return list(items)
    if n > len(items):
        log.warning("Asked for %d items but the set has %d; using all of them.", n, len(items))
        n = len(items)
    return random.Random(seed).sample(list(items), n)


def instructions(records: Sequence[dict]) -> list[str]:
    return [r["instruction"] for r in records]


# ------------------------------------------------------------------ local mirror
def _load_local(spec: DatasetSpec, path: Path, split: str | None) -> list[dict]:
    if not path.exists():
        raise DataError(
            f"Missing {path} for dataset {spec.name!r}. Point --data-dir (or ${DATA_ENV}) at a mirror "
            f"laid out like shared/datasets, or unset it to load {spec.hub} from the hub."
        )
    if spec.kind == "instructions":
        return [_instruction_record(r, path) for r in _read_json_records(path)]
    if spec.kind == "mmlu":
        return _read_mmlu_folder(path, split or "test")
    if spec.kind == "arc":
        return [_arc_record(r, path) for r in _read_json_records(path)]
    if spec.kind == "text":
        return [_text_record(r, path) for r in _read_json_records(path)]
    return [_alpaca_record(r, path) for r in _read_json_records(path)]


def _read_json_records(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines."""
    if not path.exists():
        raise DataError(f"No such file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix or replace the file.") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} must hold a list of JSON objects (one per record).")
    return records


def _require(record: dict, keys: Sequence[str], path: Path | str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{path}: a record lacks {missing} (has {sorted(record)}); fix the file.")


def _instruction_record(record: dict, path: Path | str) -> dict:
    _require(record, ["instruction"], path)
    if not isinstance(record["instruction"], str) or not record["instruction"].strip():
        raise DataError(f"{path}: an instruction is empty or not a string; fix the file.")
    return {"instruction": record["instruction"], "category": record.get("category")}


def _arc_record(record: dict, path: Path | str) -> dict:
    _require(record, ["question", "choices", "answerKey"], path)
    labels = list(record["choices"]["label"])
    if record["answerKey"] not in labels:
        raise DataError(f"{path}: answerKey {record['answerKey']!r} is not among the labels {labels}.")
    return {
        "id": record.get("id", ""),
        "question": record["question"],
        "choices": list(record["choices"]["text"]),
        "labels": labels,
        "answer": labels.index(record["answerKey"]),
    }


def _text_record(record: dict, path: Path | str) -> dict:
    if "text" in record:
        return {"text": record["text"]}
    if "context" in record and "continuation" in record:  # LAMBADA mirror
        return {"text": record["context"] + " " + record["continuation"]}
    raise DataError(f"{path}: a text record needs 'text' (or 'context' and 'continuation').")


def _alpaca_record(record: dict, path: Path | str) -> dict:
    _require(record, ["instruction", "output"], path)
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]}


def _read_mmlu_folder(folder: Path, split: str) -> list[dict]:
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise DataError(f"{folder} holds no *_{split}.csv files; expected the MMLU mirror layout.")
    records = []
    for file in files:
        subject = file.name[: -len(f"_{split}.csv")]
        with open(file, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                try:
                    records.append(
                        {
                            "subject": subject,
                            "question": row["question"],
                            "choices": [row[f"choice{i}"] for i in range(4)],
                            "answer": int(row["answer"]),
                        }
                    )
                except (KeyError, ValueError, TypeError) as exc:
                    raise DataError(
                        f"{file}: malformed row ({exc}); expected columns question,choice0..choice3,answer."
                    ) from exc
    return records


def _check_nonempty(records: list[dict], source: str) -> list[dict]:
    if not records:
        raise DataError(f"{source} holds no records; check the file or the data directory.")
    return records


# ------------------------------------------------------------------ public sources
def _load_hub(spec: DatasetSpec, split: str | None, limit: int | None) -> list[dict]:
    if spec.hub.startswith("https://"):
        try:
            with urllib.request.urlopen(spec.hub, timeout=60) as response:
                records = json.loads(response.read().decode("utf-8"))
        except OSError as exc:
            raise DataError(
                f"Could not fetch {spec.hub} ({exc}). Offline? Set --data-dir or ${DATA_ENV} to a local mirror."
            ) from exc
        return [_instruction_record(r, spec.hub) for r in records]
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError("Loading from the hub needs the 'datasets' package.") from exc
    hub_split = (spec.hub_split or "train").format(split=split)
    streaming = spec.name == "pile"
    try:
        rows = datasets.load_dataset(spec.hub, spec.hub_config, split=hub_split, streaming=streaming)
    except Exception as exc:  # datasets raises many types for network and missing-repo errors
        raise DataError(
            f"Could not load {spec.hub} from the hub ({type(exc).__name__}: {exc}). Offline? Set --data-dir "
            f"or ${DATA_ENV} to a local mirror."
        ) from exc
    records = []
    for row in rows:
        records.append(_hub_record(spec, dict(row)))
        if limit and len(records) >= limit:
            break
    return records


def _hub_record(spec: DatasetSpec, row: dict) -> dict:
    if spec.name == "jailbreakbench":
        return {"instruction": row["Goal"], "category": row.get("Category")}
    if spec.kind == "mmlu":
        return {"subject": row["subject"], "question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"])}
    if spec.kind == "arc":
        return _arc_record(row, spec.hub)
    if spec.kind == "text":
        return _text_record(row, spec.hub)
    if spec.kind == "alpaca":
        return _alpaca_record(row, spec.hub)
    return _instruction_record(row, spec.hub)

"""Artifact differences between two run folders (``refusal-directions reproduce`` lists them).

Compared, by relative path: every ``.safetensors`` artifact (tensor by tensor: shape, dtype and the
largest absolute difference), every JSON artifact (value by value: the largest absolute difference
of numbers, the first differing value otherwise) and every JSON-lines artifact (row by row: the
first differing completion). Nothing is compared with a tolerance: on the same machine a rerun of a
CPU run must be bit-identical, and any difference, however small, is listed. A file present in one
folder only is a difference too.

Not compared: the files that describe a process rather than its results (``manifest.json`` with its
timings, ``run.log``, ``reproduce.json``), the report (``report/``, written from the compared
artifacts) and the selection plots (images of the compared selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..artifacts import load_safetensors, read_json, read_jsonl

SKIPPED_FILES = ("manifest.json", "run.log", "reproduce.json")
SKIPPED_FOLDERS = ("report", "plots")
COMPARED_SUFFIXES = (".safetensors", ".json", ".jsonl")


@dataclass(frozen=True)
class Difference:
    """One difference: ``artifact`` (path relative to the run folder), ``key`` (tensor name, JSON
    path such as ``ranked[0].bypass``, or ``row 3 response``), what differs (``detail``) and, for
    numbers and tensors, the largest absolute difference (``max_abs``; None otherwise)."""

    artifact: str
    key: str
    detail: str
    max_abs: float | None = None

    def __str__(self) -> str:
        size = f" (max abs difference {self.max_abs:.3g})" if self.max_abs is not None else ""
        return f"{self.artifact} [{self.key}]: {self.detail}{size}"


def compared_artifacts(run_dir: Path) -> list[str]:
    """The relative paths of the artifacts of ``run_dir`` that ``diff_runs`` compares, sorted."""
    run_dir = Path(run_dir)
    out = []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if (path.is_file() and path.suffix in COMPARED_SUFFIXES and not path.name.startswith(".")
                and rel.name not in SKIPPED_FILES and not set(rel.parts[:-1]) & set(SKIPPED_FOLDERS)):
            out.append(rel.as_posix())
    return sorted(out)


def diff_runs(expected: Path, actual: Path) -> list[Difference]:
    """Every difference between the artifacts of run folders ``expected`` and ``actual`` (empty
    when they are identical); see the module docstring for what is compared and how."""
    expected, actual = Path(expected), Path(actual)
    if not expected.is_dir() or not actual.is_dir():
        raise FileNotFoundError(f"Both run folders must exist: {expected}, {actual}.")
    left, right = set(compared_artifacts(expected)), set(compared_artifacts(actual))
    out = [Difference(a, "-", f"only in {expected}") for a in sorted(left - right)]
    out += [Difference(a, "-", f"only in {actual}") for a in sorted(right - left)]
    for artifact in sorted(left & right):
        out += diff_artifact(artifact, expected / artifact, actual / artifact)
    return out


def diff_artifact(artifact: str, a: Path, b: Path) -> list[Difference]:
    """The differences between two versions ``a`` and ``b`` of the artifact named ``artifact``."""
    try:
        if a.suffix == ".safetensors":
            return diff_tensors(artifact, load_safetensors(a), load_safetensors(b))
        if a.suffix == ".jsonl":
            return diff_rows(artifact, read_jsonl(a), read_jsonl(b))
        return [Difference(artifact, k, d, m) for k, d, m in diff_values(read_json(a), read_json(b))]
    except (OSError, ValueError) as exc:
        return [Difference(artifact, "-", f"unreadable: {exc}")]


def diff_tensors(artifact: str, a: tuple[dict, dict], b: tuple[dict, dict]) -> list[Difference]:
    """Tensor-by-tensor differences of two loaded safetensors files ``(tensors, metadata)``."""
    (ta, ma), (tb, mb) = a, b
    out = [Difference(artifact, f"metadata.{k}", f"{ma.get(k)!r} != {mb.get(k)!r}")
           for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            out.append(Difference(artifact, name, f"tensor only in the {'first' if name in ta else 'second'} folder"))
            continue
        x, y = ta[name], tb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(Difference(artifact, name, f"shape/dtype {tuple(x.shape)} {x.dtype} != {tuple(y.shape)} {y.dtype}"))
            continue
        if x.dtype.is_floating_point:
            same_nan = x.isnan() == y.isnan()
            delta = (x.double() - y.double()).abs().nan_to_num(0.0)
            unequal = int(((x != y) & ~(x.isnan() & y.isnan())).sum())
            if unequal:
                max_abs = float(delta.max()) if bool(same_nan.all()) else math.inf
                out.append(Difference(artifact, name, f"{unequal} of {x.numel()} values differ", max_abs))
        elif not bool((x == y).all()):
            out.append(Difference(artifact, name, f"{int((x != y).sum())} of {x.numel()} values differ",
                                  float((x.double() - y.double()).abs().max())))
    return out


def diff_rows(artifact: str, a: list[dict], b: list[dict]) -> list[Difference]:
    """Differences of two JSON-lines artifacts: the row counts, and the first differing row (its
    first differing field, e.g. the completion), with the number of rows that differ."""
    out = []
    if len(a) != len(b):
        out.append(Difference(artifact, "rows", f"{len(a)} rows != {len(b)} rows"))
    differing = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if differing:
        i = differing[0]
        key, detail, max_abs = next(diff_values(a[i], b[i]))
        out.append(Difference(artifact, f"row {i} {key}", f"{detail} ({len(differing)} rows differ; first shown)", max_abs))
    return out


def diff_values(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, str, float | None]]:
    """(JSON path, what differs, max abs difference) of two JSON values, exactly compared.

    Numbers are reported one by one where they differ; a list or dict whose shape differs is
    reported once; other values (strings, booleans, None) as ``old != new``.
    """
    here = path or "."
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *[k for k in b if k not in a]]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                yield sub, f"key only in the {'first' if k in a else 'second'} folder", None
            else:
                yield from diff_values(a[k], b[k], sub)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield here, f"{len(a)} items != {len(b)} items", None
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff_values(x, y, f"{path}[{i}]")
    elif _is_number(a) and _is_number(b):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            delta = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
            yield here, f"{a!r} != {b!r}", delta
    elif a != b or type(a) is not type(b):
        yield here, f"{_short(a)} != {_short(b)}", None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

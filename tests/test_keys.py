"""Artifact keys: a stage's key changes with its code version and with the data it reads (source and
content), and not with where an identical mirror lies."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from refusal_directions import config as C
from refusal_directions import data as D
from refusal_directions.config import STAGES, RunConfig

# The mirror files the stages read, copied (a small part of the MMLU mirror is enough: keys are
# only compared between copies).
_COPIED = [
    "refusal/splits",
    "refusal/processed/jailbreakbench.json",
    "general_text/lambada_openai.jsonl",
    "arc_challenge",
    *(f"mmlu/{split}/{subject}_{split}.csv" for split in ("test", "dev") for subject in ("anatomy", "astronomy")),
]


def copy_mirror(source: Path, dest: Path) -> Path:
    """A writable copy of the parts of the mirror that the stages read."""
    for rel in _COPIED:
        src, out = source / rel, dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, out)
        else:
            shutil.copyfile(src, out)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


@pytest.fixture(scope="module")
def mirrors(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mirrors")
    return copy_mirror(data_dir, root / "a"), copy_mirror(data_dir, root / "elsewhere" / "b")


@pytest.fixture
def edited_mirror(mirrors, tmp_path) -> Path:
    return copy_mirror(mirrors[0], tmp_path / "edited")


def keys(config: RunConfig, fingerprint: str = "fp") -> dict[str, str]:
    return {stage: config.stage_key(stage, fingerprint) for stage in STAGES}


def changed(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [stage for stage in STAGES if a[stage] != b[stage]]


def append_record(path: Path, record: dict) -> None:
    """Add one record to a JSON-list or JSON-lines file."""
    if path.suffix == ".jsonl":
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    else:
        records = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps([*records, record]), encoding="utf-8")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_version_changes_that_stage_and_later_keys(stage, monkeypatch, mirrors):
    config = RunConfig(data_dir=str(mirrors[0]))
    before = keys(config)
    monkeypatch.setitem(C.STAGE_VERSIONS, stage, C.STAGE_VERSIONS[stage] + 1)
    assert changed(before, keys(config)) == list(STAGES[STAGES.index(stage):])


def test_an_identical_mirror_at_another_path_keeps_every_key(mirrors):
    a, b = (RunConfig(data_dir=str(m)) for m in mirrors)
    assert keys(a) == keys(b)
    assert a.data_identity() == b.data_identity()


@pytest.mark.parametrize(
    "rel, first_changed",
    [
        ("refusal/splits/harmful_train.json", "extract"),
        ("refusal/splits/harmless_val.json", "extract"),  # validation prompts are sampled at extraction
        ("refusal/processed/jailbreakbench.json", "infer"),
        ("refusal/splits/harmless_test.json", "infer"),
        ("general_text/lambada_openai.jsonl", "evaluate"),
        ("arc_challenge/test.jsonl", "evaluate"),
    ],
)
def test_editing_one_file_of_a_mirror_changes_the_keys_of_the_stages_reading_it(mirrors, edited_mirror, rel, first_changed):
    before = keys(RunConfig(data_dir=str(edited_mirror)))
    assert before == keys(RunConfig(data_dir=str(mirrors[0])))
    record = {"instruction": "An extra prompt.", "category": None, "context": "x", "continuation": "y"}
    append_record(edited_mirror / rel, record)
    assert changed(before, keys(RunConfig(data_dir=str(edited_mirror)))) == list(STAGES[STAGES.index(first_changed):])


def test_an_mmlu_file_added_or_edited_changes_the_evaluate_key(mirrors, edited_mirror):
    config = RunConfig(data_dir=str(edited_mirror))
    before = keys(config)
    shutil.copyfile(edited_mirror / "mmlu/test/anatomy_test.csv", edited_mirror / "mmlu/test/virology_test.csv")
    after_add = keys(config)
    assert changed(before, after_add) == ["evaluate"]
    with open(edited_mirror / "mmlu/dev/astronomy_dev.csv", "a", encoding="utf-8") as handle:
        handle.write("Another question?,a,b,c,d,0\n")
    assert changed(after_add, keys(config)) == ["evaluate"]


def test_hub_and_mirror_give_different_keys(mirrors, monkeypatch):
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    hub, mirror = RunConfig(), RunConfig(data_dir=str(mirrors[0]))
    assert changed(keys(hub), keys(mirror)) == list(STAGES)
    assert hub.data_identity("extract")["harmful_train"]["source"] == "hub"
    assert mirror.data_identity("extract")["harmful_train"]["source"] == "mirror"
    # The environment variable names the same mirror as --data-dir.
    monkeypatch.setenv(D.DATA_ENV, str(mirrors[1]))
    assert keys(RunConfig()) == keys(mirror)


def test_the_general_text_corpus_is_part_of_the_evaluate_key(mirrors, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one"}\n')
    base = RunConfig(data_dir=str(mirrors[0]))
    custom = RunConfig(data_dir=str(mirrors[0]), general_text=str(corpus))
    assert changed(keys(base), keys(custom)) == ["evaluate"]
    assert custom.data_identity()[str(corpus)]["source"] == "file"
    before = keys(custom)
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert changed(before, keys(custom)) == ["evaluate"]


def test_a_missing_file_is_keyed_not_raised(tmp_path):
    identity = RunConfig(data_dir=str(tmp_path)).data_identity()
    assert identity["harmful_train"] == {"source": "mirror", "missing": "refusal/splits/harmful_train.json"}
    assert identity["alpaca_outputs"] == {"source": "mirror", "missing": "not mirrored"}


def test_files_are_hashed_once_per_path_mtime_and_size(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[{"instruction": "a"}]')
    first = D.file_sha256(path)
    stat = path.stat()
    path.write_text('[{"instruction": "b"}]')  # same size: only the restored mtime tells the cache apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert D.file_sha256(path) == first  # served from the cache
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert D.file_sha256(path) != first

from __future__ import annotations

import json

import pytest

from refusal_directions.data import REGISTRY, DataError, DatasetUnavailable, load_dataset, sample

EXPECTED_COUNTS = {
    "harmful_train": 260, "harmful_val": 39, "harmful_test": 572,
    "harmless_train": 18793, "harmless_val": 6264, "harmless_test": 6266,
    "jailbreakbench": 100, "advbench": 520, "harmbench_val": 41, "harmbench_test": 159,
    "strongreject": 313, "malicious_instruct": 100, "tdc2023": 100, "alpaca": 31323,
    "lambada": 5153,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_registry_sets_load_from_mirror(name, data_dir):
    records = load_dataset(name, data_dir)
    assert len(records) == EXPECTED_COUNTS[name]
    if REGISTRY[name].kind == "instructions":
        assert set(records[0]) == {"instruction", "category"} and records[0]["instruction"].strip()
    else:
        assert isinstance(records[0]["text"], str) and len(records[0]["text"]) > 20


def test_jailbreakbench_categories(data_dir):
    records = load_dataset("jailbreakbench", data_dir)
    assert len({r["category"] for r in records}) == 10


def test_mmlu_and_arc(data_dir):
    dev = load_dataset("mmlu", data_dir, split="dev")
    test = load_dataset("mmlu", data_dir, split="test")
    assert len(dev) == 285 and len(test) == 14042
    assert len({r["subject"] for r in dev}) == 57
    first = next(r for r in dev if r["subject"] == "anatomy")
    assert first["question"] == "What is the embryological origin of the hyoid bone?" and first["answer"] == 3
    assert len(first["choices"]) == 4
    arc = load_dataset("arc_challenge", data_dir, split="test")
    assert len(arc) == 1172
    assert all(0 <= r["answer"] < len(r["choices"]) == len(r["labels"]) for r in arc)
    assert len(load_dataset("arc_challenge", data_dir, split="train")) == 1056


def test_env_var_sets_the_mirror(data_dir, monkeypatch):
    monkeypatch.setenv("REFUSAL_DIRECTIONS_DATA", str(data_dir))
    assert len(load_dataset("harmful_val")) == 39


def test_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match="Unknown dataset 'nope'"):
        load_dataset("nope", data_dir)
    with pytest.raises(DataError, match="Missing .*harmful_train.json.*--data-dir"):
        load_dataset("harmful_train", tmp_path)
    with pytest.raises(DatasetUnavailable, match="not in the local mirror"):
        load_dataset("pile", data_dir)
    with pytest.raises(DataError, match="splits"):
        load_dataset("mmlu", data_dir, split="validation")
    folder = tmp_path / "refusal" / "splits"
    folder.mkdir(parents=True)
    (folder / "harmful_train.json").write_text("[{\"instruction\": \"x\"}, ")
    with pytest.raises(DataError, match="harmful_train.json is not valid JSON"):
        load_dataset("harmful_train", tmp_path)
    (folder / "harmful_train.json").write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        load_dataset("harmful_train", tmp_path)
    (folder / "harmful_train.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(DataError, match="lacks \\['instruction'\\]"):
        load_dataset("harmful_train", tmp_path)


def test_local_jsonl_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(5)))
    assert load_dataset(str(path), limit=3) == [{"text": "document 0"}, {"text": "document 1"}, {"text": "document 2"}]


def test_seeded_sampling():
    items = list(range(100))
    a, b = sample(items, 10, seed=42), sample(items, 10, seed=42)
    assert a == b and len(set(a)) == 10
    assert sample(items, 10, seed=1) != a
    assert sample(items, None, seed=0) == items
    assert sorted(sample(items, 500, seed=0)) == items

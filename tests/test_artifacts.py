"""Atomic folder replacement (exports): the destination is always the old folder or the new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refusal_directions import artifacts
from refusal_directions.artifacts import replace_dir


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "model.txt").write_text(text)
    return path


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    dest = _folder(tmp_path / "out", "old")
    replace_dir(_folder(tmp_path / ".out.partial", "new"), dest)
    assert (dest / "model.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_dir(_folder(tmp_path / "fresh", "first"), tmp_path / "absent")
    assert (tmp_path / "absent" / "model.txt").read_text() == "first"


def test_a_kill_after_the_exchange_leaves_the_new_folder(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / ".out.partial", "new")

    def killed(path):
        raise KeyboardInterrupt  # the process dies before the old copy is deleted

    monkeypatch.setattr("shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, dest)
    assert (dest / "model.txt").read_text() == "new"


def test_without_an_atomic_exchange_a_failed_rename_restores_the_old_folder(tmp_path, monkeypatch):
    dest = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / ".out.partial", "new")
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt  # killed between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, dest)
    assert (dest / "model.txt").read_text() == "old"


def test_exchange_is_atomic_on_linux(tmp_path):
    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    if not artifacts._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    assert (a / "model.txt").read_text() == "B" and (b / "model.txt").read_text() == "A"

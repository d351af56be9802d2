from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # make tests/tiny.py importable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local dataset mirror ($REFUSAL_DIRECTIONS_DATA, else ../shared/datasets beside the repo)."""
    path = Path(os.environ.get("REFUSAL_DIRECTIONS_DATA", REPO.parent / "shared" / "datasets"))
    if not (path / "README.md").exists():
        pytest.fail(f"No dataset mirror at {path}: set REFUSAL_DIRECTIONS_DATA to shared/datasets.")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def embedded_adapter():
    """The embedded 0.5B model (tests using it are marked `embedded`)."""
    from refusal_directions import load_model

    return load_model("embedded", device="cpu")

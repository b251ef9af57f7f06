"""Shared fixtures: the real data in ../shared/data and a small generated consortium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedrad.phantoms import write_consortium

REPO = Path(__file__).resolve().parents[1]
CANARIES = (b"ZZCANARY", b"CANARY-")


def shared_data() -> Path:
    """../shared/data, or $FEDRAD_SHARED_DATA."""
    return Path(os.environ.get("FEDRAD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cxr_root() -> Path:
    root = shared_data() / "cxr"
    if not root.is_dir():
        pytest.skip(f"real CXR data not found at {root} (set FEDRAD_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def phantom_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three generated hospitals, 6 patients x 2 images each, 128 px."""
    return write_consortium(tmp_path_factory.mktemp("phantoms"), patients=6,
                            images_per_patient=2, size=128, seed=7)


def find_canaries(paths: list[Path]) -> list[str]:
    """Every file under `paths` that holds a canary token (bytes, any encoding of ASCII)."""
    hits = []
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            data = path.read_bytes()
            if any(token in data for token in CANARIES):
                hits.append(str(path))
    return hits


@pytest.fixture
def task_identity():
    """What the SuperNode sets in a ClientApp process before a Message can be made."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None

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


EXPORT_BASE = {"image-size": 32, "num-rounds": 2, "min-sites": 3, "min-train-sites": 3,
        "local-epochs": 2, "batch-size": 4, "learning-rate": 0.01, "dp-enabled": False,
        "secagg-enabled": False, "augment": False}
EXPORT_TASKS = {"seg": {"task": "lung-seg", "model": "unet"},
         "cls": {"task": "cxr-classify", "model": "densenet121", "labels": "label_nodule",
                 "num-rounds": 1}}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, phantom_sites):
    """One federated model per task, trained in process and exported by the CLI (used by
    the evaluate/predict tests and the PACS push tests)."""
    import subprocess
    import sys

    from flwr.supercore.task_identity import TaskIdentity

    from fedrad import processes as proc
    from tests.inprocess import (
        BASELINE_POLICY,
        InProcessGrid,
        real_site,
        run_server,
        signing_keys,
    )

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    tmp = tmp_path_factory.mktemp("evaluate")
    consortium = tmp / "consortium"
    consortium.mkdir()
    private, public = signing_keys(consortium)
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for run_id, (name, settings) in enumerate(EXPORT_TASKS.items(), start=1):
            config = {**EXPORT_BASE, **settings}
            sites = {n: real_site(n, f"site-{n}", phantom_sites[h], tmp / name / f"s{n}",
                                  public, config, run_id, policy=BASELINE_POLICY)
                     for n, h in {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}.items()}
            run_server(InProcessGrid(sites), config, consortium / "server", private,
                       monkeypatch, run_id=run_id)
            folder = tmp / f"export-{name}"
            result = subprocess.run([sys.executable, "-m", "fedrad.cli", "models", "export",
                                     str(run_id), "--out", str(folder), "--consortium",
                                     str(consortium)],
                                    capture_output=True, text=True, check=False,
                                    env=proc.child_env({}))
            assert result.returncode == 0, result.stdout + result.stderr
            out[name] = folder
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    return {"folders": out, "public": public, "tmp": tmp}

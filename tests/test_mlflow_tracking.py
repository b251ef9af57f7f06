"""`fedrad run track`: a real run's record read back from MLflow's own client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrad import processes as proc
from server.registry import RunFolder
from tests.conftest import find_canaries

FEDRAD = [sys.executable, "-m", "fedrad.cli"]


@pytest.fixture(autouse=True)
def _file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own client, read back


def _track(exported, uri: str) -> dict:
    done = subprocess.run([*FEDRAD, "run", "track", "1", "--tracking-uri", uri,
                           "--consortium", str(exported["tmp"] / "consortium"), "--json"],
                          capture_output=True, text=True, check=False,
                          env=proc.child_env({}), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_run_config_rounds_sites_and_best_model_in_mlflow(exported, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    logged = _track(exported, uri)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(logged["mlflow_run_id"])
    run = RunFolder.open(exported["tmp"] / "consortium" / "server", "1")
    rows = run.rounds()
    assert parent.data.params["num-rounds"] == "2" and parent.data.params["task"] == "lung-seg"
    history = client.get_metric_history(parent.info.run_id, f"pooled_{rows[0]['score_metric']}")
    assert [m.step for m in history] == [r["server_round"] for r in rows] == [1, 2]
    assert [m.value for m in history] == pytest.approx([r["pooled_score"] for r in rows])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["fedrad.site"] for c in children) == sorted(rows[-1]["sites"])
    for child in children:
        site = child.data.tags["fedrad.site"]
        for name, value in rows[-1]["sites"][site]["evaluation"].items():
            assert child.data.metrics[f"eval/{name}"] == pytest.approx(value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "best-model")}
    assert {"best-model/model.json", "best-model/model.pt", "best-model/model.sig"} <= artifacts
    assert find_canaries([tmp_path / "mlruns"]) == []


def test_tracking_again_logs_no_round_twice(exported, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    first = _track(exported, uri)
    again = _track(exported, uri)
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert first["rounds_logged"] == [1, 2] and again["rounds_logged"] == []
    assert again["best_model_round"] is None  # already logged
    client = MlflowClient(tracking_uri=uri)
    metric = next(k for k in client.get_run(first["mlflow_run_id"]).data.metrics
                  if k.startswith("pooled_"))
    assert len(client.get_metric_history(first["mlflow_run_id"], metric)) == 2
    assert len(client.search_runs([client.get_experiment_by_name("fedrad").experiment_id])) == 4

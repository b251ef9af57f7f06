"""`fedrad run track`: a run folder's record in an MLflow tracking store (optional extra:
`pip install fedrad[mlflow]`, mlflow-skinny).

One MLflow run per fedrad run (experiment "fedrad", tag fedrad.run_id) holds the run config
as parameters and the pooled metrics per round (step = round); one child run per site
(tag mlflow.parentRunId, as NVFLARE's MLflow receiver does) holds that site's training and
evaluation metrics and its ε; the best round's model is an artifact, exported and signed
as `fedrad models export` does. Tracking again logs only rounds not yet logged, so a
coordinator can call it after every round or once at the end. Sites need nothing: all of
it comes from what the server already records (numbers, site ids, settings; no PHI).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrad.model_registry import BEST, ModelRegistryError, export
from server.registry import RunFolder

EXPERIMENT = "fedrad"
LOGGED = "fedrad.rounds_logged"
ROUND_METRICS = ("pooled_score", "wall_seconds", "overhead_seconds", "sites_trained",
                 "update_norm", "central_epsilon")


class TrackingError(RuntimeError):
    """MLflow is missing or the tracking store refuses the run."""


def _client(tracking_uri: str) -> Any:
    if tracking_uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a local
        # mlruns/ folder needs no database (mlflow-skinny brings none).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise TrackingError("MLflow is not installed: pip install 'fedrad[mlflow]' "
                            "(mlflow-skinny)") from exc
    return MlflowClient(tracking_uri=tracking_uri)


def _run(client: Any, experiment: str, tags: dict[str, str], name: str) -> Any:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment], filter_string=query, max_results=1)
    return found[0] if found else client.create_run(experiment, tags=tags, run_name=name)


def _metrics(values: dict[str, Any], step: int, prefix: str = "") -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"{prefix}{k}", float(v), now, step) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


def track_run(home: Path, run_id: str, tracking_uri: str,
              signing_key: Ed25519PrivateKey | None) -> dict[str, Any]:
    """Log run `run_id` of the server home `home`; what was logged, and where."""
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        return _track(client, home, run_id, tracking_uri, signing_key)
    except MlflowException as exc:
        raise TrackingError(f"{tracking_uri}: the MLflow tracking store refused run "
                            f"{run_id}: {exc.message}") from exc


def _track(client: Any, home: Path, run_id: str, tracking_uri: str,
           signing_key: Ed25519PrivateKey | None) -> dict[str, Any]:
    from mlflow.entities import Param

    run = RunFolder.open(home, run_id)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(EXPERIMENT))
    parent = _run(client, experiment_id, {"fedrad.run_id": run_id, "fedrad.role": "run"},
                  f"fedrad run {run_id}")
    parent_id = parent.info.run_id
    tags = parent.data.tags
    done = int(tags.get(LOGGED, "0"))
    if done == 0:
        config = run.read_json("config.json")
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        for start in range(0, len(params), 100):
            client.log_batch(parent_id, params=params[start:start + 100])
    registry = run.read_json("registry.json")
    rows = [r for r in run.rounds() if r["server_round"] > done]
    children: dict[str, str] = {}
    for row in rows:
        step = int(row["server_round"])
        client.log_batch(parent_id, metrics=_metrics(
            {k: row.get(k) for k in ROUND_METRICS}, step)
            + _metrics({f"pooled_{row['score_metric']}": row["pooled_score"]}, step))
        for site, values in row.get("sites", {}).items():
            if site not in children:
                children[site] = _run(client, experiment_id,
                                      {"fedrad.run_id": run_id, "fedrad.role": "site",
                                       "fedrad.site": site, "mlflow.parentRunId": parent_id},
                                      f"{run_id}/{site}").info.run_id
            client.log_batch(children[site], metrics=_metrics(values.get("train", {}), step,
                                                              "train/")
                             + _metrics(values.get("evaluation", {}), step, "eval/"))
    last = max([done, *(int(r["server_round"]) for r in rows)])
    client.set_tag(parent_id, LOGGED, str(last))
    client.set_tag(parent_id, "fedrad.status", str(registry.get("status", "")))
    epsilon = run.read_json("epsilon.json") or {}
    if epsilon:
        client.log_batch(parent_id, metrics=_metrics(
            {f"epsilon/{site}": value for site, value in epsilon.items()}, last))
    best = registry.get("best", {}).get("round")
    logged_best = None
    if (best is not None and signing_key is not None
            and str(best) != tags.get("fedrad.best_round_logged")):
        with tempfile.TemporaryDirectory(prefix="fedrad-mlflow-") as scratch:
            try:
                folder = export(home, f"{run_id}:{BEST}", Path(scratch) / "model", signing_key)
            except ModelRegistryError as exc:
                raise TrackingError(f"best model of run {run_id} not exported: {exc}") from exc
            client.log_artifacts(parent_id, str(folder), artifact_path="best-model")
        client.set_tag(parent_id, "fedrad.best_round_logged", str(best))
        logged_best = best
    return {"run_id": run_id, "mlflow_run_id": parent_id, "tracking_uri": tracking_uri,
            "rounds_logged": [int(r["server_round"]) for r in rows], "sites": sorted(children),
            "best_model_round": logged_best}

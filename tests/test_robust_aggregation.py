"""Robust strategies against a hostile site, and updates the server must reject, with the
real ServerApp and four real ClientApps (their own DICOM folders) in one process
(tests/inprocess.py). The hostile site trains like the others and sends what the outside
world could: its update x100, or NaN."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from common import keys
from server.registry import RunFolder
from tests.inprocess import (
    BASELINE_POLICY,
    InProcessGrid,
    real_site,
    run_server,
    scaled,
    signing_keys,
)

pytestmark = pytest.mark.usefixtures("task_identity")
CONFIG = {"task": "lung-seg", "model": "unet", "image-size": 32, "num-rounds": 3,
          "min-sites": 4, "min-train-sites": 3, "local-epochs": 2, "batch-size": 4,
          "learning-rate": 0.01, "dp-enabled": False, "secagg-enabled": False,
          "round-timeout": 60.0, "augment": False, "val-fraction": 0.3}
HOSPITALS = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c", 4: "hospital-a"}


def _federate(tmp_path, phantom_sites, monkeypatch, name: str, settings: dict,
              hostile=None) -> list[dict]:
    private, public = signing_keys(tmp_path)
    config = {**CONFIG, **settings}
    sites = {node: real_site(node, f"site-{node}", phantom_sites[h],
                             tmp_path / name / f"site-{node}", public, config,
                             policy=BASELINE_POLICY)
             for node, h in HOSPITALS.items()}
    if hostile is not None:
        sites[4] = hostile(sites[4])
    run_dir = run_server(InProcessGrid(sites), config, tmp_path / name / "server", private,
                         monkeypatch)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _dice(rows: list[dict]) -> float:
    """Mean Dice of the final global model over the three honest sites' held-out data."""
    last = rows[-1]["sites"]
    return float(np.mean([last[f"site-{n}"]["evaluation"][keys.EVAL_DICE] for n in (1, 2, 3)]))


def test_trimmed_mean_and_krum_survive_a_site_scaling_its_update_by_100_and_fedavg_does_not(
        tmp_path, phantom_sites, monkeypatch) -> None:
    attack = lambda site: scaled(site, 100.0)  # noqa: E731
    clean = _dice(_federate(tmp_path, phantom_sites, monkeypatch, "clean", {}))
    fedavg = _dice(_federate(tmp_path, phantom_sites, monkeypatch, "fedavg", {}, attack))
    trimmed = _dice(_federate(tmp_path, phantom_sites, monkeypatch, "trimmed",
                              {"strategy": "fedtrimmedavg", "trim-fraction": 0.25}, attack))
    krum = _dice(_federate(tmp_path, phantom_sites, monkeypatch, "krum",
                           {"strategy": "krum", "krum-byzantine": 1, "min-train-sites": 4},
                           attack))
    print(f"Dice: clean FedAvg {clean:.3f}, attacked FedAvg {fedavg:.3f}, "
          f"FedTrimmedAvg {trimmed:.3f}, Krum {krum:.3f}")
    assert clean > 0.5  # the clean federation learned the lungs
    assert abs(trimmed - clean) <= 0.05 * clean
    assert abs(krum - clean) <= 0.05 * clean
    assert abs(fedavg - clean) > 0.05 * clean


def test_a_site_sending_nan_is_rejected_and_the_model_stays_finite(
        tmp_path, phantom_sites, monkeypatch) -> None:
    rows = _federate(tmp_path, phantom_sites, monkeypatch, "nan",
                     {"num-rounds": 2, "max-update-norm": 1e4},
                     lambda site: scaled(site, float("nan")))
    assert [r["sites"]["site-4"]["status"] for r in rows] == ["rejected-not-finite"] * 2
    assert all(r["sites_trained"] == 3 for r in rows)
    assert all(r["sites"][f"site-{n}"]["status"] == "ok" for r in rows for n in (1, 2, 3))
    run = RunFolder(tmp_path / "nan" / "server" / "runs" / "1")
    final = run.load_checkpoint(2)
    assert all(bool(t.isfinite().all()) for t in final.values())
    audit = [json.loads(x) for x in
             (tmp_path / "nan" / "server" / "audit.jsonl").read_text().splitlines()]
    rejected = [e for e in audit if e["event"] == "update-rejected"]
    assert [(e["round"], e["reason"]) for e in rejected] == [(1, "rejected-not-finite"),
                                                             (2, "rejected-not-finite")]
    assert rows[-1]["pooled_score"] > 0  # the three honest sites still trained a model


def test_an_update_beyond_the_norm_bound_is_rejected(tmp_path, phantom_sites,
                                                     monkeypatch) -> None:
    rows = _federate(tmp_path, phantom_sites, monkeypatch, "norm",
                     {"num-rounds": 1, "max-update-norm": 50.0},
                     lambda site: scaled(site, 1000.0))
    statuses = {s: v["status"] for s, v in rows[0]["sites"].items()}
    assert statuses == {"site-1": "ok", "site-2": "ok", "site-3": "ok",
                        "site-4": "rejected-norm"}
    assert rows[0]["update_norm"] < 50.0


def test_sites_asked_one_at_a_time_give_the_same_model(tmp_path, phantom_sites,
                                                       monkeypatch) -> None:
    """max-sites-in-flight = 1 (what a 100-site simulation uses to bound server memory)
    sends one training request per push and reaches the model of all-at-once."""
    private, public = signing_keys(tmp_path)
    pushes: dict[str, list[int]] = {}
    models = {}
    secrets = {node: os.urandom(32) for node in HOSPITALS}  # each hospital's own split
    for name, window in (("all", 0), ("one", 1)):
        config = {**CONFIG, "num-rounds": 1, "local-epochs": 1, "max-sites-in-flight": window}
        sites = {node: real_site(node, f"site-{node}", phantom_sites[h],
                                 tmp_path / name / f"site-{node}", public, config,
                                 policy=BASELINE_POLICY, secret=secrets[node])
                 for node, h in HOSPITALS.items()}

        counts = pushes.setdefault(name, [])

        class Counting(InProcessGrid):
            def push_messages(self, messages, counts=counts):
                messages = list(messages)
                if messages and messages[0].metadata.message_type == "train":
                    counts.append(len(messages))
                return super().push_messages(messages)

        run_dir = run_server(Counting(sites), config, tmp_path / name / "server", private,
                             monkeypatch)
        models[name] = RunFolder(run_dir).load_checkpoint(1)
    assert pushes == {"all": [4], "one": [1, 1, 1, 1]}
    for key, value in models["all"].items():
        np.testing.assert_allclose(np.asarray(models["one"][key]), np.asarray(value),
                                   rtol=1e-6, atol=1e-7, err_msg=key)

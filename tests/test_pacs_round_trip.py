"""The whole hospital loop against real PACS (Orthanc): each of three hospitals pulls its
cohort from its own PACS over DICOMweb, they train a federated lung-segmentation model on
what they pulled, the model predicts on a study read from one hospital's PACS, and its SEGs
are stored back there and read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from fedrad import processes as proc
from fedrad.pacs import PacsConnection, open_client
from fedrad.site_pull import pull
from tests.conftest import find_canaries
from tests.inprocess import BASELINE_POLICY, InProcessGrid, real_site, run_server, signing_keys
from tests.pacs import start_pacs

COHORTS = ("radiopaedia", "eurorad", "literature_other")  # each with a PACS of its own
CONFIG = {"task": "lung-seg", "model": "unet", "image-size": 32, "num-rounds": 2,
          "min-sites": 3, "min-train-sites": 3, "local-epochs": 1, "batch-size": 8,
          "learning-rate": 0.01, "dp-enabled": False, "secagg-enabled": False,
          "augment": False}


def test_pull_train_predict_push_read_back(cxr_root: Path, tmp_path: Path) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    servers = {site: start_pacs(tmp_path / f"pacs-{site}") for site in COHORTS}
    try:
        pulled, running = {}, {}
        for site, server in servers.items():
            pacs = running[site] = next(server)
            connection = PacsConnection(pacs.url, pacs.credentials, pacs.ca_bundle)
            client = open_client(connection)
            files = [p for p in (cxr_root / site).rglob("*") if p.is_file()
                     and p.suffix != ".csv"]
            datasets = [pydicom.dcmread(p) for p in files]
            for start in range(0, len(datasets), 25):
                client.store_instances(datasets[start:start + 25])
            summary = pull(connection, tmp_path / "sites" / site / "data")
            assert summary.new == len(files) and not summary.failed
            pulled[site] = summary.folder
        consortium = tmp_path / "consortium"
        consortium.mkdir()
        private, public = signing_keys(consortium)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        with pytest.MonkeyPatch.context() as monkeypatch:
            sites = {n: real_site(n, site, pulled[site], tmp_path / "sites" / site / "work",
                                  public, CONFIG, 1, policy=BASELINE_POLICY)
                     for n, site in enumerate(COHORTS, start=1)}
            run_dir = run_server(InProcessGrid(sites), CONFIG, consortium / "server",
                                 private, monkeypatch, run_id=1)
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                .splitlines()]
        assert [r["server_round"] for r in rows] == [1, 2]
        assert sorted(rows[-1]["sites"]) == sorted(COHORTS)
        assert 0.0 < rows[-1]["pooled_score"] <= 1.0  # Dice on the pulled validation patients
        pacs = running["radiopaedia"]
        client = open_client(PacsConnection(pacs.url, pacs.credentials, pacs.ca_bundle))
        study = str(pydicom.dcmread(next((cxr_root / "radiopaedia").rglob("IM*.dcm")),
                                    stop_before_pixels=True).StudyInstanceUID)
        done = subprocess.run(
            [sys.executable, "-m", "fedrad.cli", "predict", "1:best", "--consortium",
             str(consortium), "--dicomweb", pacs.url, "--study", study, "--credentials",
             str(pacs.credentials), "--ca-bundle", str(pacs.ca_bundle), "--out",
             str(tmp_path / "predicted"), "--json"], capture_output=True, text=True,
            check=False, env=proc.child_env({}), timeout=300)
        assert done.returncode == 0, done.stderr
        stored = json.loads(done.stdout)["stored"]["sop_instance_uids"]
        found = client.search_for_instances(study_instance_uid=study,
                                            search_filters={"Modality": "SEG"})
        back = {i["00080018"]["Value"][0] for i in found}
        assert stored and set(stored) <= back
        # the coordinator's side holds no patient name or id of any site
        assert find_canaries([consortium]) == []
    finally:
        for server in servers.values():
            server.close()

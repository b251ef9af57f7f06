"""The site worker: a real process on a Unix socket, the same numbers as in-process
training, refusals with their fixed codes, and no service without the site's key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing.connection import Client

import numpy as np
import pytest

from client import worker
from client.errors import SiteRefusal
from common import keys
from common.config import RunConfig
from common.models import build_model
from common.weights import pack, plain_state_dict, to_arrays

RUN_CONFIG = {"image-size": 32, "local-epochs": 1, "batch-size": 8, "num-rounds": 2,
              "dp-target-epsilon": 8.0, "augment": False}


def _start(work_dir) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "client.worker", "--work-dir",
                                str(work_dir)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (work_dir / worker.SOCKET_NAME).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(process.stdout.read().decode() if process.stdout else "")
        time.sleep(0.2)
    return process


@pytest.fixture
def site(phantom_sites, tmp_path):
    work = tmp_path / "work"
    process = _start(work)
    node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                   "work-dir": str(work), "epsilon-budget": 20.0, "threads": 1}
    yield work, node_config
    process.terminate()
    process.wait(timeout=30)
    assert not (work / worker.SOCKET_NAME).exists()  # cleaned up on SIGTERM


def test_worker_trains_like_the_clientapp_process_and_stays_warm(site, tmp_path) -> None:
    from client import site_round

    work, node_config = site
    assert oct((work / worker.KEY_NAME).stat().st_mode & 0o777) == "0o600"
    assert oct((work / worker.SOCKET_NAME).stat().st_mode & 0o777) == "0o600"
    global_arrays = pack(to_arrays(plain_state_dict(build_model(
        RunConfig.from_mapping(RUN_CONFIG)))))
    request = {"run_id": 7, "node_config": node_config, "run_config": RUN_CONFIG,
               "global_arrays": global_arrays, "server_round": 1, "masked": False}
    remote = worker.call(work, "train", request)
    local_config = {**node_config, "work-dir": str(tmp_path / "local-work")}
    (tmp_path / "local-work").mkdir()  # the same site: its secret, so its split
    (tmp_path / "local-work" / "site.secret").write_bytes((work / "site.secret").read_bytes())
    local = site_round.train_outcome(**{**request, "node_config": local_config})
    assert remote["site_id"] == "hospital-a" and remote["weight"] == local["weight"]
    assert remote["metrics"][keys.EPSILON_TOTAL] == pytest.approx(
        local["metrics"][keys.EPSILON_TOTAL])
    # DP noise comes from the OS CSPRNG: the same request gives another update ...
    assert not all(np.allclose(a, b) for a, b in zip(remote["update"], local["update"],
                                                     strict=True))
    # ... and without DP the worker computes what the ClientApp process computes.
    # (SGD: Adam's first step is lr·sign(g), which float noise flips where g ~ 0)
    plain = {**request, "run_id": 9,
             "run_config": {**RUN_CONFIG, "dp-enabled": False, "optimizer": "sgd"}}
    remote_plain = worker.call(work, "train", plain)
    local_plain = site_round.train_outcome(**{**plain, "node_config": local_config})
    for a, b in zip(remote_plain["update"], local_plain["update"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert remote["metrics"][keys.LOAD_SECONDS] > 0
    second = worker.call(work, "evaluate", {k: v for k, v in request.items() if k != "masked"})
    assert second["metrics"][keys.LOAD_SECONDS] == 0.0  # warm: no loading, no imports
    assert 0 <= second["metrics"][keys.EVAL_DICE] <= 1


def test_refusal_keeps_its_code_and_the_worker_goes_on(site) -> None:
    work, node_config = site
    broke = {**node_config, "epsilon-budget": 0.5}
    global_arrays = pack(to_arrays(plain_state_dict(build_model(
        RunConfig.from_mapping(RUN_CONFIG)))))
    request = {"run_id": 8, "node_config": broke, "run_config": RUN_CONFIG,
               "global_arrays": global_arrays, "server_round": 1, "masked": False}
    with pytest.raises(SiteRefusal) as refusal:
        worker.call(work, "train", request)
    assert refusal.value.code == keys.ERROR_BUDGET_REFUSED
    assert refusal.value.reason == keys.REASON_BUDGET_REFUSED
    with pytest.raises(SiteRefusal) as failure:  # a bad request: a fixed reason, no text
        worker.call(work, "train", {**request, "global_arrays": [global_arrays[0][:-1]]})
    assert failure.value.code == keys.ERROR_SITE_FAILED
    assert worker.call(work, "evaluate", {k: v for k, v in request.items() if k != "masked"})


def test_no_service_without_the_sites_key(site) -> None:
    work, _ = site
    from multiprocessing import AuthenticationError

    with pytest.raises((AuthenticationError, EOFError, OSError)):
        Client(str(work / worker.SOCKET_NAME), family="AF_UNIX", authkey=os.urandom(32))
    with pytest.raises(worker.WorkerUnavailable):
        worker.call(work.parent / "elsewhere", "evaluate", {})

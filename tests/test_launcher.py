"""fedrad.launcher, the site's warm ClientApp launcher, against a real SuperNode.

The end-to-end path (every message of every round through the launcher) is checked by
tests/test_deployment.py; here: who may claim a SuperNode's tasks, and what a forked
ClientApp inherits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

from fedrad import processes as proc
from fedrad.launcher import fork_task, runtime_client


@pytest.fixture
def supernode(tmp_path):
    """A SuperNode in process isolation with a SuperExec secret. It has no SuperLink to
    reach (it keeps retrying), but its Runtime API is up: that is all a launcher talks to."""
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    port = proc.free_port()
    log = tmp_path / "supernode.log"
    with proc.ProcessGroup() as group:
        node = group.start("supernode", [
            str(proc.BIN / "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{proc.free_port()}", "--isolation", "process",
            "--superexec-auth-secret-file", str(secret), "--host", "127.0.0.1",
            "--port", str(port), "--max-retries", "1000", "--max-wait-time", "600"],
            log=log, cwd=tmp_path, env={"FLWR_HOME": str(tmp_path / "flwr")})
        proc.wait_for_port(port, 60, node, log)
        yield {"address": f"127.0.0.1:{port}", "secret": secret, "log": log,
               "tmp": tmp_path}


def _launcher(address: str, secret: Path, log: Path) -> subprocess.Popen[bytes]:
    command = proc.launcher_command(runtime_port=int(address.rsplit(":", 1)[1]),
                                    secret=secret)
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=proc.child_env({}))


def test_only_the_holder_of_the_supernodes_secret_may_claim_its_tasks(supernode) -> None:
    client = runtime_client(supernode["address"], supernode["secret"].read_bytes())
    try:
        response = client.AcquireTask(
            AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()
    assert not response.HasField("task") and response.token == ""  # answered: none pending

    wrong = supernode["tmp"] / "wrong.secret"
    wrong.write_bytes(os.urandom(32))
    right_log, wrong_log = supernode["tmp"] / "right.log", supernode["tmp"] / "wrong.log"
    right = _launcher(supernode["address"], supernode["secret"], right_log)
    intruder = _launcher(supernode["address"], wrong, wrong_log)
    try:
        assert intruder.wait(timeout=60) == 3, wrong_log.read_text()[-2000:]
        time.sleep(1.0)
        assert right.poll() is None, right_log.read_text()[-2000:]  # still serving
    finally:
        for launcher in (right, intruder):
            launcher.kill()
            launcher.wait()
    assert "refused this launcher's secret" in wrong_log.read_text()
    assert "SuperExec authentication failed" in supernode["log"].read_text()
    assert "claiming ClientApp tasks" in right_log.read_text()


def test_each_forked_clientapp_draws_its_own_numpy_stream(tmp_path) -> None:
    """Flower's SecAgg+ quantisation draws from numpy's global generator: children forked
    from one launcher must not repeat each other's (or the launcher's) draws."""
    np.random.seed(1234)
    out = [tmp_path / f"child-{i}.npy" for i in range(3)]

    def draw(path: Path) -> int:
        np.save(path, np.random.rand(8))
        return 0

    for path in out:
        pid = fork_task(lambda path=path: draw(path))  # type: ignore[misc]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    draws = [np.load(path) for path in out]
    parent = np.random.rand(8)  # what every child would have drawn without the reseed
    for i, first in enumerate(draws):
        assert not np.allclose(first, parent)
        for second in draws[i + 1:]:
            assert not np.allclose(first, second)


def test_a_child_that_fails_reports_its_exit_code() -> None:
    pid = fork_task(lambda: 7)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7


def test_the_launcher_refuses_to_run_holding_the_apps_own_code() -> None:
    """A child must import the run's signed FAB; a launcher that already imported
    client/common/server would hand the children its own copy instead."""
    result = subprocess.run(
        [sys.executable, "-c", "import common.keys; from fedrad.launcher import main; "
         "main(['--runtime-api-address', '127.0.0.1:1', '--secret-file', '/nonexistent'])"],
        capture_output=True, text=True, timeout=60, env=proc.child_env({}))
    assert result.returncode == 1
    assert "imported ['common']" in result.stderr and "signed app" in result.stderr

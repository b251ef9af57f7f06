"""fedrad.launcher, the site's warm ClientApp launcher, against a real SuperNode.

The end-to-end path (every message of every round through the launcher) is checked by
tests/test_deployment.py; here: who may claim a SuperNode's tasks, and what a forked
ClientApp inherits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

from fedrad import processes as proc
from fedrad.launcher import FabRefused, fork_task, pin_fabs, runtime_client
from fedrad.site_node import runtime_tls


@pytest.fixture
def supernode(tmp_path):
    """A SuperNode in process isolation with a SuperExec secret. It has no SuperLink to
    reach (it keeps retrying), but its Runtime API is up: that is all a launcher talks to."""
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    port = proc.free_port()
    log = tmp_path / "supernode.log"
    tls = runtime_tls(tmp_path / "runtime-tls")
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps({"apps": ["0" * 64]}))
    with proc.ProcessGroup() as group:
        node = group.start("supernode", [
            str(proc.BIN / "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{proc.free_port()}", "--isolation", "process",
            "--superexec-auth-secret-file", str(secret), "--host", "127.0.0.1",
            "--port", str(port), "--max-retries", "1000", "--max-wait-time", "600",
            "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--ssl-ca-certfile", str(tls.ca_cert)],
            log=log, cwd=tmp_path, env={"FLWR_HOME": str(tmp_path / "flwr")})
        proc.wait_for_port(port, 60, node, log)
        yield {"address": f"127.0.0.1:{port}", "secret": secret, "log": log,
               "tmp": tmp_path, "tls": tls, "apps": apps}


def _launcher(address: str, secret: Path, log: Path, tls, apps: Path
              ) -> subprocess.Popen[bytes]:
    command = proc.launcher_command(runtime_port=int(address.rsplit(":", 1)[1]),
                                    secret=secret, tls=tls, allowed_apps=apps)
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=proc.child_env({}))


def test_only_the_holder_of_the_supernodes_secret_may_claim_its_tasks(supernode) -> None:
    client = runtime_client(supernode["address"], supernode["secret"].read_bytes(),
                            supernode["tls"].ca_cert.read_bytes())
    try:
        response = client.AcquireTask(
            AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()
    assert not response.HasField("task") and response.token == ""  # answered: none pending

    wrong = supernode["tmp"] / "wrong.secret"
    wrong.write_bytes(os.urandom(32))
    right_log, wrong_log = supernode["tmp"] / "right.log", supernode["tmp"] / "wrong.log"
    tls, apps = supernode["tls"], supernode["apps"]
    right = _launcher(supernode["address"], supernode["secret"], right_log, tls, apps)
    intruder = _launcher(supernode["address"], wrong, wrong_log, tls, apps)
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
    """Code that draws from numpy's global generator in a ClientApp: children forked from
    one launcher must not repeat each other's (or the launcher's) draws."""
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
         "main(['--runtime-api-address', '127.0.0.1:1', '--secret-file', '/nonexistent', "
         "'--runtime-ca', '/nonexistent', '--allowed-apps', '/nonexistent'])"],
        capture_output=True, text=True, timeout=60, env=proc.child_env({}))
    assert result.returncode == 1
    assert "imported ['common']" in result.stderr and "signed app" in result.stderr


class _Impostor:
    """Something else answering on the Runtime API port: it has a certificate of its own
    (anyone can make one) but not the one `fedrad site start` issued to the SuperNode."""

    def __init__(self, folder: Path, tls: bool) -> None:
        import http.server
        import ssl
        import threading

        self.requests = 0
        impostor = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                impostor.requests += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            own = runtime_tls(folder)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(own.cert, own.key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("impostor_tls", [False, True])
def test_an_impostor_on_the_runtime_port_gets_no_request_from_the_launcher(
        tmp_path, impostor_tls) -> None:
    """Over plain HTTP the launcher sent its secret-signed AcquireTask (and children
    their task tokens, then the site's replies) to whatever listened on the port. With
    the SuperNode's own certificate pinned, the TLS handshake fails first."""
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    tls = runtime_tls(tmp_path / "runtime-tls")  # what the real SuperNode would present
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps({"apps": []}))
    impostor = _Impostor(tmp_path / "impostor-tls", impostor_tls)
    log = tmp_path / "launcher.log"
    launcher = _launcher(f"127.0.0.1:{impostor.port}", secret, log, tls, apps)
    try:
        time.sleep(4.0)
        assert launcher.poll() is None, log.read_text()[-2000:]  # waits for the real one
    finally:
        launcher.kill()
        launcher.wait()
        impostor.server.shutdown()
    assert impostor.requests == 0


def test_a_child_installs_only_a_fab_the_site_pinned(monkeypatch) -> None:
    import hashlib

    from flwr.supernode.runtime import run_clientapp as runtime_module

    installed = []
    monkeypatch.setattr(runtime_module, "install_from_fab",
                        lambda content, *a, **k: installed.append(content))
    pinned = b"the signed build"
    pin_fabs(frozenset({hashlib.sha256(pinned).hexdigest()}))
    runtime_module.install_from_fab(pinned, None, True)
    with pytest.raises(FabRefused, match="not a pinned build"):
        runtime_module.install_from_fab(b"an older signed build", None, True)
    assert installed == [pinned]

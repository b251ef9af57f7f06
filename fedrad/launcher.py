"""The site's ClientApp launcher: Flower's SuperExec, kept warm.

A SuperNode started with `--isolation process` launches nothing itself. A SuperExec asks
its Runtime API for pending tasks (`AcquireTask`, signed with the site's SuperExec secret,
so nothing else on the host can claim a task) and starts a `flwr-clientapp` for each one.
Flower's own `flower-superexec` polls once a second and starts a fresh Python for every
message, which imports Flower again: 1.6 s alone, about 3 s when three sites on two
cores start one at once, paid for every message of a round.

This launcher imports Flower's ClientApp runtime once, polls every 0.1 s while a run is
active, and forks a child per task that runs Flower's own `run_clientapp` with the task's
token. Every message still runs in a process of its own, as with `flwr-clientapp`: nothing
of one message's state reaches the next. The launcher holds no threads, sockets to
anything but the Runtime API, or data; a child reseeds numpy's global generator, so no
two children share a stream (Python's `random` reseeds itself on fork). Each child pulls
objects with fedrad.flower_waits' short backoff. It imports none of the app's packages
(client, common, server), so each child loads the run's signed FAB, as `flwr-clientapp`
does.

Trust runs both ways. The launcher proves itself to the SuperNode with the secret; the
SuperNode proves itself to the launcher with a TLS certificate that `fedrad site start`
issues afresh at every start (`--runtime-ca`): whatever else answers on the Runtime API
port (another process that won the port, a restarted impostor) gets no request at all.
And each child installs only a FAB whose sha256 the site pinned (`--allowed-apps`, the
kit's apps.json): an older signed build, or a FAB served by anything but the real
SuperNode, is refused before it is installed or imported.

Usage: python -m fedrad.launcher --runtime-api-address 127.0.0.1:PORT --secret-file F
           --runtime-ca CERT --allowed-apps APPS.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, constant
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as runtime_module
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedrad.flower_waits import shorten_object_pulls

LOG = logging.getLogger("fedrad.launcher")

ACTIVE_POLL_S = 0.1  # while messages keep coming (a run's rounds)
IDLE_POLL_S = 0.5  # once none came for IDLE_AFTER_S
IDLE_AFTER_S = 60.0
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
RECONNECT_S = 0.5  # while the SuperNode restarts (Flower's own client backs off to 20 s)


class SecretRefused(RuntimeError):
    """The SuperNode does not accept this launcher's SuperExec secret."""


class FabRefused(RuntimeError):
    """The run's FAB is not one of the builds this site pinned."""


def pin_fabs(allowed: frozenset[str], module: Any = runtime_module) -> None:
    """In a child: Flower's runtime `module` (the ClientApp's, or the ServerApp's)
    installs only a FAB whose sha256 is in `allowed`."""
    install = module.install_from_fab

    def pinned(content: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(content, bytes):  # Flower's runtime passes the FAB's bytes
            raise FabRefused("a FAB given by path is not checked here; refused")
        digest = hashlib.sha256(content).hexdigest()
        if digest not in allowed:
            LOG.error("FAB %s... is not a pinned build; refused", digest[:12])
            raise FabRefused(f"FAB sha256 {digest} is not a pinned build")
        return install(content, *args, **kwargs)

    module.install_from_fab = pinned


def read_pins(path: Path, extra: list[str]) -> frozenset[str]:
    """The pinned FAB hashes: the kit's apps.json and the operator's --allow-app."""
    pins = set(json.loads(path.read_text())["apps"]) | set(extra)
    if not pins:
        LOG.error("no app is pinned (%s is empty and no --allow-app was given): every "
                  "ClientApp will be refused", path)
    return frozenset(pins)


def consortium_pins(consortium: Path) -> frozenset[str]:
    """On the server: the builds in the consortium's apps/ whose signature by the
    coordinator's code-signing key verifies (Flower's message: 8-byte signed_at + the
    FAB's SHA-256; fedrad.app_registry signs). Read afresh for every task, so an app
    signed since the start is accepted; cryptography only, no app package imported."""
    import base64

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = serialization.load_ssh_public_key((consortium / "code-signing.pub").read_bytes())
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise FabRefused("code-signing.pub is not an Ed25519 key")
    index = consortium / "apps" / "index.json"
    good = set()
    for entry in json.loads(index.read_text()) if index.exists() else []:
        fab = consortium / "apps" / f"{entry['sha256']}.fab"
        if not fab.is_file() or hashlib.sha256(fab.read_bytes()).hexdigest() != entry["sha256"]:
            continue
        message = int(entry["signed_at"]).to_bytes(8, "big") + bytes.fromhex(entry["sha256"])
        padded = str(entry["signature"]) + "=" * (-len(str(entry["signature"])) % 4)
        try:
            public.verify(base64.urlsafe_b64decode(padded), message)
        except InvalidSignature:
            LOG.error("app %s... in %s: its signature does not verify with code-signing.pub",
                      entry["sha256"][:12], index)
            continue
        good.add(str(entry["sha256"]))
    return frozenset(good)


def run_server_task(address: str, token: str, parent_pid: int, ca: bytes,
                    consortium: Path) -> int:
    """In a forked child on the server host: Flower's ServerApp runtime for one run,
    installing only a FAB the coordinator's code-signing key signed."""
    import importlib
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue

    server_runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    try:
        pin_fabs(consortium_pins(consortium), module=server_runtime)
        # replies are listed before their objects are up: pull them without 1-10 s waits
        shorten_object_pulls(importlib.import_module("flwr.superlink.grid.http_grid"),
                             "pull_objects")
        log_queue: Queue[str | None] = Queue()
        mirror_output_to_queue(log_queue)  # `flwr log` shows the ServerApp's output
        server_runtime.run_serverapp(runtime_api_address=address, log_queue=log_queue,
                                     token=token, insecure=False, certificates=ca,
                                     parent_pid=parent_pid, runtime_dependency_install=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported, and the child still exits
        traceback.print_exc()
        return 1
    return 0


def runtime_client(address: str, secret: bytes, ca: bytes) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API that may claim tasks (as `flower-superexec`),
    over TLS verified with the certificate `fedrad site start` issued to the SuperNode."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=ca,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({_ACQUIRE}))],
        retry_invoker=RetryInvoker(wait_gen_factory=lambda: constant(RECONNECT_S),
                                   recoverable_exceptions=httpx.TransportError,
                                   max_tries=None, max_time=None, jitter=None),
    )


def run_task(address: str, token: str, parent_pid: int, ca: bytes,
             pins: frozenset[str]) -> int:
    """In a forked child: Flower's ClientApp runtime for one task (TLS to the SuperNode,
    pinned FABs only); the exit code."""
    try:
        pin_fabs(pins)
        # the SuperNode lists a request before it has its objects: no 1-10 s waits
        shorten_object_pulls(runtime_module, "pull_and_inflate_object_from_tree")
        run_clientapp(runtime_api_address=address, token=token, insecure=False,
                      certificates=ca, parent_pid=parent_pid,
                      runtime_dependency_install=False)
    except SystemExit as exc:  # Flower ends every task with flwr_exit -> sys.exit
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported, and the child still exits
        traceback.print_exc()
        return 1
    return 0


def fork_task(task: Callable[[], int]) -> int:
    """Run `task` in a child process with a fresh numpy global generator; return its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        np.random.seed(np.frombuffer(os.urandom(16), dtype=np.uint32))
        code = task()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class Launcher:
    """Claims the SuperNode's ClientApp tasks and runs each in a forked child."""

    address: str
    secret: bytes
    ca: bytes
    pins: frozenset[str]
    consortium: Path | None = None  # set: a server-host launcher of ServerApps
    children: dict[int, tuple[int, float]] = field(default_factory=dict)  # pid -> task, start
    launched: int = 0
    failed: int = 0
    _last_task: float = field(default=-IDLE_AFTER_S)

    def poll_once(self, client: RuntimeHttpClient) -> bool:
        """Claim one pending task, if any, and start it; whether one was started."""
        kind = (TaskType.SERVER_APP if self.consortium is not None
                else TaskType.CLIENT_APP).value
        response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[kind]))
        if not (response.HasField("task") and response.token):
            return False
        if response.task.type != kind:  # asked for one kind only
            LOG.error("task %d has type %r; this launcher runs %s only",
                      response.task.task_id, response.task.type, kind)
            return False
        token, me = response.token, os.getpid()
        consortium = self.consortium
        pid = fork_task(
            (lambda: run_task(self.address, token, me, self.ca, self.pins))
            if consortium is None else
            (lambda: run_server_task(self.address, token, me, self.ca, consortium)))
        self._last_task = time.monotonic()
        self.children[pid] = (response.task.task_id, self._last_task)
        self.launched += 1
        LOG.info("task %d: ClientApp started (pid %d)", response.task.task_id, pid)
        return True

    def reap(self) -> None:
        """Collect finished children; a failed one is logged (Flower reports it upstream)."""
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            task_id, started = self.children.pop(pid, (None, time.monotonic()))
            code = os.waitstatus_to_exitcode(status)
            seconds = time.monotonic() - started
            if code != 0:
                self.failed += 1
                LOG.warning("task %s: ClientApp exited with %d after %.2f s", task_id, code,
                            seconds)
            else:
                LOG.info("task %s: ClientApp done in %.2f s", task_id, seconds)

    def interval(self) -> float:
        idle = time.monotonic() - self._last_task > IDLE_AFTER_S
        return IDLE_POLL_S if idle else ACTIVE_POLL_S

    def serve(self, stop: Callable[[], bool]) -> None:
        """Poll until `stop()`. A Runtime API that is down (the SuperNode restarting) is
        tried again every RECONNECT_S; one that refuses the secret ends the launcher."""
        client = runtime_client(self.address, self.secret, self.ca)
        try:
            while not stop():
                self.reap()
                try:
                    if self.poll_once(client):
                        continue  # another message may be waiting already
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == httpx.codes.UNAUTHORIZED:
                        raise SecretRefused(self.address) from None
                    LOG.warning("Runtime API at %s answered %d; trying again", self.address,
                                exc.response.status_code)
                time.sleep(self.interval())
        finally:
            client.close()


def read_secret(path: Path) -> bytes:
    secret = path.read_bytes()
    if len(secret) < 16:
        raise SystemExit(f"{path}: the SuperExec secret must be at least 16 bytes; "
                         "`fedrad site start` writes a fresh one at every start")
    return secret


APP_PACKAGES = ("client", "common", "server")  # what the signed FAB brings


def check_app_not_imported() -> None:
    """Each child must import the run's signed FAB, not a copy this process holds."""
    held = sorted({name.split(".")[0] for name in sys.modules} & set(APP_PACKAGES))
    if held:
        raise SystemExit(f"the launcher imported {held}; a ClientApp would run that code "
                         "instead of the run's signed app")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--runtime-ca", type=Path, required=True,
                        help="the SuperNode's Runtime API certificate (fedrad site start)")
    parser.add_argument("--allowed-apps", type=Path,
                        help="the kit's apps.json: the FAB builds this site runs")
    parser.add_argument("--consortium", type=Path,
                        help="on the server host: run ServerApps (only builds that the "
                             "consortium's code-signing.pub verifies) instead of ClientApps")
    parser.add_argument("--allow-app", action="append", default=[],
                        help="one more pinned FAB sha256 (repeatable)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s launcher: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    check_app_not_imported()
    if (args.allowed_apps is None) == (args.consortium is None):
        parser.error("give --allowed-apps (a site) or --consortium (the server host)")
    pins = read_pins(args.allowed_apps, args.allow_app) if args.allowed_apps else frozenset()
    launcher = Launcher(args.runtime_api_address, read_secret(args.secret_file),
                        args.runtime_ca.read_bytes(), pins, consortium=args.consortium)
    parent = os.getppid()
    LOG.info("claiming %s tasks from %s", "ServerApp" if args.consortium else "ClientApp",
             args.runtime_api_address)
    try:
        launcher.serve(stop=lambda: os.getppid() != parent)  # orphaned: our site is gone
    except SecretRefused:
        LOG.error("the SuperNode at %s refused this launcher's secret (%s): start the site "
                  "with `fedrad site start`, which gives both the same fresh secret",
                  args.runtime_api_address, args.secret_file)
        raise SystemExit(3) from None
    LOG.info("stopping: %d tasks launched, %d failed", launcher.launched, launcher.failed)


if __name__ == "__main__":
    main()

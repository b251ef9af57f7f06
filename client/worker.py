"""The site worker: one long-lived process per site that keeps torch, MONAI and Opacus
imported and the site's data and model warm across rounds.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message, and importing
the training stack there costs 8-10 s, paid by every site for its training and its
evaluation message in every round. When the worker runs, the ClientApp stays light: it
hands the round's plain inputs (global arrays, round, the site's node config and the
run config) to the worker over a Unix socket in the site's work folder and packs the
worker's plain outputs into Flower's reply. Without a worker the ClientApp computes
the same thing in its own process (client.site_round), only slower.

Local only: the socket lives in the work folder (mode 0600) and every connection must
pass `multiprocessing.connection`'s HMAC challenge with a 32-byte key the worker writes
to `worker.key` (mode 0600) when it starts. The worker never talks to the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from client.errors import SiteRefusal, site_failure

LOG = logging.getLogger("fedrad.client")
SOCKET_NAME = "worker.sock"
KEY_NAME = "worker.key"


class WorkerUnavailable(RuntimeError):
    """No worker is listening for this work folder."""


def call(work_dir: Path, kind: str, request: dict[str, Any]) -> Any:
    """Ask the site's worker to compute `kind` ("train" or "evaluate").

    Raises WorkerUnavailable when none is running, SiteRefusal when the site refuses
    or fails (fixed, sanitised reasons only).
    """
    socket_path, key_path = work_dir / SOCKET_NAME, work_dir / KEY_NAME
    if not socket_path.exists() or not key_path.exists():
        raise WorkerUnavailable(str(socket_path))
    try:
        connection = Client(str(socket_path), family="AF_UNIX", authkey=key_path.read_bytes())
    except (OSError, EOFError, AuthenticationError) as exc:  # a stale socket or key
        raise WorkerUnavailable(str(socket_path)) from exc
    with connection:
        connection.send((kind, request))
        status, payload = connection.recv()
    if status == "ok":
        return payload
    code, reason = payload
    raise SiteRefusal(code, reason)


def _handle(kind: str, request: dict[str, Any]) -> tuple[str, Any]:
    from client import site_round

    try:
        if kind == "train":
            return "ok", site_round.train_outcome(**request)
        if kind == "evaluate":
            return "ok", site_round.evaluate_outcome(**request)
        raise ValueError(f"unknown request {kind!r}")
    except SiteRefusal as refusal:
        return "refused", (refusal.code, refusal.reason)
    except Exception:  # noqa: BLE001 - the worker outlives a failed round
        LOG.exception("%s failed at this site", kind)
        failure = site_failure()
        return "refused", (failure.code, failure.reason)


def serve(work_dir: Path) -> None:
    """Listen on the work folder's socket until SIGTERM/SIGINT; one request at a time
    (a SuperNode runs one message at a time)."""
    import torch._dynamo  # noqa: F401 - torch imports it at the first optimizer (about 3 s)

    from client import site_round  # noqa: F401 - the heavy imports, paid once here

    work_dir.mkdir(parents=True, exist_ok=True)
    socket_path, key_path = work_dir / SOCKET_NAME, work_dir / KEY_NAME
    socket_path.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    old_umask = os.umask(0o177)  # the socket is created 0600
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)

    def stop(*_: object) -> None:
        listener.close()
        socket_path.unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("site worker ready on %s", socket_path)
    print(f"site worker ready on {socket_path}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError, AuthenticationError):  # failed the HMAC challenge
            LOG.warning("site worker: a connection was refused")
            continue
        with connection:
            try:
                kind, request = connection.recv()
            except (EOFError, OSError):
                continue
            connection.send(_handle(kind, request))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="the site's work folder (node config work-dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    serve(args.work_dir.expanduser().resolve())


if __name__ == "__main__":
    main()

"""fedrad's ServerApp and ClientApp in one process, without Flower's transport: an
in-process Grid hands each message to a site's real ClientApp (client.app.app, every mod)
and returns its reply. Used where a test needs many rounds of the real code under
controlled site behaviour (a hostile site's update is what the outside world could send).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import keys

Site = Callable[[Message], Message | None]


class InProcessGrid(Grid):
    """push delivers to the site function at once; pull returns the replies kept."""

    def __init__(self, sites: dict[int, Site]) -> None:
        self.sites = sites
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        self._count = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for sent in messages:
            message = copy.deepcopy(sent)
            self._count += 1
            message_id = f"m{self._count}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = 1
            reply = self.sites[message.metadata.dst_node_id](message)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
                self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def signing_keys(folder: Path) -> tuple[Path, Path]:
    """A consortium model-signing key pair (PEM private, OpenSSH public)."""
    key = Ed25519PrivateKey.generate()
    private, public = folder / "signing.key", folder / "signing.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# A site policy that allows a deliberate no-DP, no-SecAgg baseline run.
BASELINE_POLICY = {"require-dp": False, "require-secure-aggregation": False}


def real_site(node: int, site_id: str, data: Path, work: Path, verify_key: Path,
              run_config: dict[str, Any], run_id: int = 1,
              policy: dict[str, Any] | None = None, secret: bytes | None = None) -> Site:
    """A hospital running fedrad's ClientApp on its own DICOM folder; `policy` relaxes
    its strict default site policy (node-config keys of client.site_policy); `secret`
    is its site secret (the same hospital in two work folders: the same split)."""
    from client.app import app

    if secret is not None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "site.secret").write_bytes(secret)

    context = Context(run_id=run_id, node_id=node, node_config={
        "site-id": site_id, "data-dir": str(data), "work-dir": str(work),
        "epsilon-budget": 1000.0, "model-verify-key": str(verify_key), "threads": 1,
        **(policy or {}),
    }, state=RecordDict(), run_config=run_config)

    def handle(message: Message) -> Message | None:
        return app(message, context)

    return handle


def scaled(site: Site, factor: float) -> Site:
    """A hostile site: trains like `site` but sends its update multiplied by `factor`."""

    def handle(message: Message) -> Message | None:
        reply = site(message)
        if reply is None or reply.has_error() or keys.UPDATE not in reply.content.array_records:
            return reply
        update = reply.content.array_records[keys.UPDATE].to_numpy_ndarrays()
        reply.content.array_records[keys.UPDATE] = ArrayRecord(
            [np.asarray(a * factor, dtype=a.dtype) for a in update])
        return reply

    return handle


def run_server(grid: Grid, run_config: dict[str, Any], home: Path, signing_key: Path,
               monkeypatch: Any, run_id: int = 1) -> Path:
    """fedrad's ServerApp main over `grid`; returns the run folder."""
    from server import app as server_app

    monkeypatch.setenv("FEDRAD_SERVER_HOME", str(home))
    monkeypatch.setenv("FEDRAD_MODEL_SIGNING_KEY", str(signing_key))
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    server_app.main(grid, context)
    return home / "runs" / str(run_id)

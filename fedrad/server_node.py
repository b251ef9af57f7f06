"""`fedrad server start`: the consortium's server side on one host.

One command starts the consortium's app registry (127.0.0.1; signed ClientApp code,
see fedrad/app_registry.py) and a SuperLink with TLS and node authentication whose
state database lives in the consortium folder, registers every provisioned site's
node key, unregisters revoked ones, and supervises the SuperLink until it is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.audit import AuditLog, digest
from common.model_signing import SIGNING_KEY_ENV
from common.pki import ProvisioningError, serves_loopback
from fedrad import processes as proc
from fedrad.app_registry import REGISTRY_ENV, AppRegistry
from fedrad.consortium import Consortium, load_consortium
from server.masked_sum import CA_ENV

DEFAULT_PORT = 9092


@dataclass(frozen=True)
class ServerHome:
    """Where the server side keeps its state: `state`, by default `<consortium>/server/`
    (a container or service keeps the consortium read-only and its state on a volume)."""

    consortium: Path
    state: Path | None = None

    @property
    def root(self) -> Path:
        return self.state if self.state is not None else self.consortium / "server"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the coordinator's `flwr` CLI, configured for this SuperLink."""
        return self.root / "cli"

    @property
    def ready(self) -> Path:
        """Written once the SuperLink listens and the sites are registered."""
        return self.root / "ready.json"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes.json"

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.root / "audit.jsonl")


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def sync_sites(consortium: Consortium, home: ServerHome) -> dict[str, Any]:
    """Register every provisioned site's node key; unregister every revoked one.

    nodes.json maps site → {node_id, key_sha256, status}; each change is audited.
    """
    nodes: dict[str, Any] = _load(home.nodes)
    audit = home.audit
    for public in sorted((consortium.folder / "sites").glob("*.pub")):
        site = public.stem
        key_sha = digest(public.read_bytes())
        if nodes.get(site, {}).get("key_sha256") == key_sha:
            continue
        out = proc.flwr_json(home.cli_home, "supernode", "register", str(public))
        nodes[site] = {"node_id": str(out["node-id"]), "key_sha256": key_sha,
                       "status": "registered"}
        audit.append("site-registered", site=site, node_id=nodes[site]["node_id"],
                     key_sha256=key_sha)
    revoked = json.loads((consortium.folder / "revoked.json").read_text()) \
        if (consortium.folder / "revoked.json").exists() else []
    for entry in revoked:
        record = nodes.get(entry["site"])
        if record is None or record["status"] != "registered":
            continue
        proc.flwr_json(home.cli_home, "supernode", "unregister", record["node_id"])
        record["status"] = "unregistered"
        audit.append("site-unregistered", site=entry["site"], node_id=record["node_id"])
    _save(home.nodes, nodes)
    return nodes


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def start_server(consortium_folder: Path, *, host: str, port: int,
                 say: Callable[[str], None], state: Path | None = None) -> int:
    """Run the server side in the foreground; return the SuperLink's exit code."""
    consortium = load_consortium(consortium_folder.resolve())
    home = ServerHome(consortium.folder, state.resolve() if state else None)
    os.umask(0o077)  # keys, state, runs and logs: 0600 / 0700, whatever the caller's umask
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.root.chmod(0o700)
    home.ready.unlink(missing_ok=True)
    if not serves_loopback(consortium.tls.server_cert):
        raise ProvisioningError(
            f"{consortium.tls.server_cert} does not name 127.0.0.1, where the SuperLink now "
            "listens (its Control API stays off the network); issue a new server "
            "certificate with `fedrad consortium init` or add 127.0.0.1 to its hosts")
    reach = "127.0.0.1" if host in {"0.0.0.0", "::"} else host  # noqa: S104
    address = f"{reach}:{port}"
    control = f"127.0.0.1:{proc.free_port()}"  # SuperLink: Control + runtime + Fleet
    proc.write_cli_config(home.cli_home, name="fedrad", address=control,
                          ca_cert=consortium.tls.ca_cert)
    signal.signal(signal.SIGTERM, _raise_stop)
    log = home.root / "superlink.log"
    try:
        with AppRegistry(consortium.folder) as registry, proc.ProcessGroup() as group:
            control_port = int(control.rpartition(":")[2])
            secret = proc.write_secret(home.root / "superexec.secret")
            superlink = group.start(
                "superlink",
                proc.superlink_command(host="127.0.0.1", port=control_port,
                                       ca_cert=consortium.tls.ca_cert,
                                       cert=consortium.tls.server_cert,
                                       key=consortium.tls.server_key,
                                       database=home.root / "state.db",
                                       superexec_secret=secret),
                log=log, cwd=home.root,
                env={"FLWR_HOME": str(home.root / "flwr"), REGISTRY_ENV: registry.api_url},
            )
            proc.wait_for_port(control_port, 60, superlink, log)
            launcher_log = home.root / "launcher.log"
            launcher = group.start(  # ServerApps: signed by the code-signing key only
                "launcher",
                proc.server_launcher_command(runtime=control, secret=secret,
                                             ca_cert=consortium.tls.ca_cert,
                                             consortium=consortium.folder),
                log=launcher_log, cwd=home.root,
                env={"FLWR_HOME": str(home.root / "flwr"), "FEDRAD_SERVER_HOME": str(home.root),
                     SIGNING_KEY_ENV: str(consortium.folder / "signing.key"),
                     CA_ENV: str(consortium.tls.ca_cert)})
            gateway_log = home.root / "gateway.log"
            gateway = group.start(
                "gateway",
                proc.gateway_command(listen=f"{host}:{port}", upstream=control,
                                     ca_cert=consortium.tls.ca_cert,
                                     cert=consortium.tls.server_cert,
                                     key=consortium.tls.server_key),
                log=gateway_log, cwd=home.root, env={})
            proc.wait_for_port(port, 60, gateway, gateway_log, host=reach)
            nodes = sync_sites(consortium, home)
            active = sorted(s for s, n in nodes.items() if n["status"] == "registered")
            home.audit.append("server-started", address=address, sites=active)
            _save(home.ready, {"pid": os.getpid(), "address": address, "control": control,
                               "registry": registry.url, "sites": active})
            say(f"Fleet API on {host}:{port} (TLS, node authentication; Control API on "
                f"{control} only); sites: "
                f"{', '.join(active) or 'none yet'}; signed apps served from "
                f"{registry.url}; logs in {log}")
            helpers = {"Fleet gateway": (gateway, gateway_log),
                       "ServerApp launcher": (launcher, launcher_log)}
            while superlink.poll() is None and all(p.poll() is None
                                                   for p, _ in helpers.values()):
                time.sleep(0.5)
            for name, (process, process_log) in helpers.items():
                if superlink.poll() is None and process.poll() is not None:
                    say(f"the {name} exited with {process.returncode}; see {process_log}")
                    return int(process.returncode)
            return int(superlink.returncode)
    except (_Stop, KeyboardInterrupt):
        say("stopping the SuperLink")
        return 0
    finally:
        home.ready.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

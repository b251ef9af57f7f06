"""`fedrad site start`: one hospital's node, from its startup kit.

Opens the kit (sealed kits need the passphrase), installs it in `<work-dir>/kit/`
(mode 0700), checks the site's own settings before anything starts, then runs the
site worker, the ClientApp launcher (fedrad.launcher) and a SuperNode with TLS (the
consortium CA), the site's node key, and `--trusted-entities` (only ClientApp code the
consortium signed runs here), and supervises them until stopped. A site restarted after
a crash waits until the SuperLink lets its node key in again. The SuperNode's exit ends
the command with its code, so a service manager can restart it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from client.site_config import SiteConfig
from common import pki
from common.audit import AuditLog, digest
from fedrad import processes as proc
from fedrad.kit import Kit


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


# A site that died without saying goodbye stays "online" at the SuperLink until
# HEARTBEAT_PATIENCE heartbeat intervals pass; until then its node key cannot be activated
# again (Flower's FLEET_NODE_ACTIVATION_FAILED, code 2004). A restarted site waits that out.
ONLINE_AFTER_DEATH_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
REJOIN_PATIENCE_S = ONLINE_AFTER_DEATH_S + 30.0
REJOIN_RETRY_S = 5.0
_ACTIVATION_REFUSED = "[code: 2004]"


def still_online(log: Path, offset: int) -> bool:
    """Whether the SuperNode that wrote `log` past `offset` was refused activation because
    the SuperLink still lists its node key online."""
    with log.open("rb") as handle:
        handle.seek(offset)
        return _ACTIVATION_REFUSED in handle.read().decode("utf-8", "replace")


def node_config(kit_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The SuperNode's node config: the hospital's values plus the kit's verify key and
    identity (site certificate, node key, consortium CA) for secure aggregation.

    Parsed with the ClientApp's own parser so a bad value is refused here, naming the
    key, before any process starts.
    """
    config = {**values, "model-verify-key": str(kit_dir / "signing.pub"),
              "site-certificate": str(kit_dir / "site.pem"),  # client.secure_sum
              "node-key": str(kit_dir / "node.key"), "consortium-ca": str(kit_dir / "ca.pem")}
    SiteConfig.from_mapping(config)
    return config


def runtime_tls(folder: Path) -> proc.RuntimeTLS:
    """A fresh CA and certificate for the SuperNode's Runtime API on 127.0.0.1 (the
    launcher verifies the SuperNode by it); the previous start's are removed."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    ca_cert, _ = pki.create_ca(folder, "fedrad site runtime")
    tls = pki.issue_server_cert(folder, ["127.0.0.1"])
    return proc.RuntimeTLS(ca_cert=ca_cert, cert=tls.server_cert, key=tls.server_key)


def start_site(kit: Kit, values: dict[str, Any], *, superlink: str | None,
               say: Callable[[str], None], worker: bool = True,
               warm_launcher: bool = True, allow_apps: tuple[str, ...] = ()) -> int:
    """Run the site in the foreground; return the SuperNode's exit code.

    `warm_launcher` runs ClientApps from fedrad.launcher (Flower imported once, a fork per
    message); without it the SuperNode starts Flower's `flower-superexec`, which starts a
    fresh `flwr-clientapp` per message."""
    os.umask(0o077)  # everything this site and its processes write: 0600 / 0700
    work_dir = Path(str(values["work-dir"])).expanduser().resolve()
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    work_dir.chmod(0o700)  # the ledger, the cache's identifiers, logs, audit: private
    kit_dir = kit.install(work_dir / "kit")
    config = node_config(kit_dir, {**values, "work-dir": str(work_dir),
                                   "data-dir": str(Path(str(values["data-dir"])).resolve())})
    site = str(config["site-id"])
    policy = SiteConfig.from_mapping(config).policy
    for relaxed in policy.insecure_settings():
        say(f"WARNING: site policy {relaxed}: this site accepts runs without that protection")
    if site != kit.info["site"]:
        say(f"note: site-id {site!r} differs from the kit's site {kit.info['site']!r}")
    address = superlink or kit.info["superlink"]
    logs = work_dir / "logs"
    AuditLog(work_dir / "audit.jsonl").append(
        "site-started", site=site, superlink=address,
        node_key_sha256=digest(kit.files["node.pub"]),
        trusted_key_sha256=digest(kit.files["trusted-entities.yaml"]),
        policy={k: v for k, v in config.items() if k in policy.keys()})
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with proc.ProcessGroup() as group:
            if worker:
                group.start("worker", proc.worker_command(work_dir=work_dir),
                            log=logs / "worker.log", cwd=work_dir, env={})
            runtime_port = proc.free_port()
            secret = proc.write_secret(kit_dir / "superexec.secret") if warm_launcher else None
            tls = runtime_tls(kit_dir / "runtime-tls") if warm_launcher else None
            if secret is not None and tls is not None:
                group.start("launcher", proc.launcher_command(
                    runtime_port=runtime_port, secret=secret, tls=tls,
                    allowed_apps=kit_dir / "apps.json", allow=allow_apps),
                            log=logs / "launcher.log", cwd=work_dir,
                            env={"FLWR_HOME": str(work_dir / "flwr")})
            else:
                say("WARNING: --no-warm-launcher: Flower's own SuperExec runs the ClientApps; "
                    "the Runtime API is plain HTTP on 127.0.0.1, the task token is on its "
                    "command line and the kit's app pins (apps.json) are not enforced")
            command = proc.supernode_command(
                superlink=address, ca_cert=kit_dir / "ca.pem", auth_key=kit_dir / "node.key",
                port=runtime_port, node_config=config,
                trusted_entities=kit_dir / "trusted-entities.yaml", superexec_secret=secret,
                runtime_tls=tls)
            say(f"site {site}: SuperNode connecting to {address} (TLS, node key "
                f"{digest(kit.files['node.pub'])[:12]}, signed apps only); logs in {logs}")
            first_try = time.monotonic()
            while True:
                log = logs / "supernode.log"
                offset = log.stat().st_size if log.exists() else 0
                supernode = group.start("supernode", command, log=log, cwd=work_dir,
                                        env={"FLWR_HOME": str(work_dir / "flwr")})
                while supernode.poll() is None:
                    time.sleep(0.5)
                if not (still_online(log, offset)
                        and time.monotonic() - first_try < REJOIN_PATIENCE_S):
                    break
                say(f"the SuperLink still lists site {site} online from before it stopped "
                    f"(it marks a node offline {ONLINE_AFTER_DEATH_S:.0f} s after its last "
                    f"heartbeat); connecting again in {REJOIN_RETRY_S:.0f} s")
                time.sleep(REJOIN_RETRY_S)
            say(f"SuperNode exited with {supernode.returncode}; see {log}")
            return int(supernode.returncode)
    except (_Stop, KeyboardInterrupt):
        say(f"stopping site {site}")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def read_passphrase(passphrase_file: Path | None) -> str | None:
    """The kit passphrase: from a file (first line) or $FEDRAD_KIT_PASSPHRASE."""
    from fedrad.kit import PASSPHRASE_ENV

    if passphrase_file is not None:
        return passphrase_file.read_text().splitlines()[0] if passphrase_file.stat().st_size \
            else ""
    return os.environ.get(PASSPHRASE_ENV)

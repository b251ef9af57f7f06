"""Start and stop the real Flower processes of a deployment on this host.

Every process is started in its own session and tracked by a `ProcessGroup`;
leaving the group (normally, on an exception or on Ctrl-C) terminates them all.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent


class DeploymentError(RuntimeError):
    """A process of the deployment did not start or a CLI call failed."""


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment plus `extra`, with this interpreter's bin/ first on PATH, and
    Flower's usage telemetry off.

    Flower's SuperLink and SuperNode start `flower-superexec` and `flwr-clientapp` by
    name, so they must find this installation's scripts even when no venv is active.
    Flower reports usage events to Flower Labs over HTTPS unless told not to; nothing but
    the federation's own traffic leaves a hospital (and on a closed network every event
    cost a TLS set-up and a timeout inside each ClientApp).
    """
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, **extra, "PATH": path, "FLWR_TELEMETRY_ENABLED": "0"}


def write_secret(path: Path) -> Path:
    """A fresh SuperExec secret (mode 0600) shared by a SuperNode or SuperLink and the
    launcher that claims its tasks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    os.chmod(path, 0o600)
    return path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None, host: str = "127.0.0.1") -> None:
    """Wait until host:port accepts connections (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise DeploymentError(f"process exited with {process.returncode}:\n{tail}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


@dataclass
class ProcessGroup:
    """Processes started for one deployment; `stop_all` ends every one of them."""

    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _grace: dict[int, float] = field(default_factory=dict)

    def start(self, name: str, command: list[str], *, log: Path, cwd: Path,
              env: dict[str, str], grace: float = 10.0) -> subprocess.Popen[bytes]:
        """Start `command` in its own session; `grace`: seconds it gets to stop on SIGTERM
        (longer for a `fedrad ... start` that stops processes of its own)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        self._logs.append(handle)
        process = subprocess.Popen(
            command, cwd=cwd, env=child_env(env), stdout=handle,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.processes.append((name, process))
        self._grace[process.pid] = grace
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float | None = None) -> None:
        """Terminate one process and everything in its session."""
        grace = self._grace.get(process.pid, 10.0) if grace is None else grace
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # children (flwr-*app) too
        except (ProcessLookupError, PermissionError):
            pass
        process.wait(timeout=grace)

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            self.stop(process)
        for handle in self._logs:
            handle.close()
        self.processes.clear()
        self._logs.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def write_cli_config(flwr_home: Path, *, name: str, address: str, ca_cert: Path) -> None:
    """The `flwr` CLI's connection to our SuperLink (TLS, verified with the consortium CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{ca_cert.resolve()}"\n'
    )


def flwr_cli(flwr_home: Path, *args: str, timeout: float = 120.0) -> str:
    """Run the `flwr` CLI against the configured SuperLink; return stdout."""
    result = subprocess.run(
        [str(BIN / "flwr"), *args], env=child_env({"FLWR_HOME": str(flwr_home)}),
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        raise DeploymentError(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout


def flwr_json(flwr_home: Path, *args: str) -> dict[str, Any]:
    """A `flwr ... --format json` call; its `success` must be true."""
    out = flwr_cli(flwr_home, *args, "--format", "json")
    data = json.loads(out[out.index("{"):])
    if not data.get("success", False):
        raise DeploymentError(f"flwr {' '.join(args)}: {data}")
    return dict(data)


def run_status(flwr_home: Path, run_id: str) -> str:
    """Flower's status of a run, e.g. 'running' or 'finished:completed'.

    `flwr run` exits 0 even when a run fails, so success is decided here.
    """
    data = flwr_json(flwr_home, "ls", "--run-id", run_id)
    return str(data["runs"][0]["status"])


def superlink_command(*, host: str, port: int, ca_cert: Path, cert: Path, key: Path,
                      database: Path, superexec_secret: Path | None = None) -> list[str]:
    """The SuperLink; with `superexec_secret` it launches no ServerApp itself
    (`--isolation process`): fedrad's launcher holding that secret claims them."""
    isolation = ["--isolation", "process", "--superexec-auth-secret-file",
                 str(superexec_secret)] if superexec_secret is not None else []
    return [
        str(BIN / "flower-superlink"), *isolation,
        "--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
        "--enable-supernode-auth", "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]


def gateway_command(*, listen: str, upstream: str, ca_cert: Path, cert: Path,
                    key: Path) -> list[str]:
    """fedrad's Fleet gateway (fedrad.fleet_gateway): the public listener."""
    return [sys.executable, "-m", "fedrad.fleet_gateway", "--listen", listen,
            "--upstream", upstream, "--certfile", str(cert), "--keyfile", str(key),
            "--ca-certfile", str(ca_cert)]


def node_config_arg(values: dict[str, Any]) -> str:
    """Flower's `--node-config` syntax: space separated key=value, strings quoted."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value or " " in value:
                raise DeploymentError(f"node-config {key}: spaces and quotes are not supported")
            parts.append(f'{key}="{value}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def worker_command(*, work_dir: Path) -> list[str]:
    """The site worker (client.worker): training stack imported once, data kept warm."""
    return [sys.executable, "-m", "client.worker", "--work-dir", str(work_dir)]


@dataclass(frozen=True)
class RuntimeTLS:
    """The SuperNode's Runtime API certificate, issued afresh at every site start."""

    ca_cert: Path
    cert: Path
    key: Path


def launcher_command(*, runtime_port: int, secret: Path, tls: RuntimeTLS,
                     allowed_apps: Path, allow: tuple[str, ...] = ()) -> list[str]:
    """The site's warm ClientApp launcher (fedrad.launcher), in place of `flower-superexec`."""
    return [sys.executable, "-m", "fedrad.launcher",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--secret-file", str(secret),
            "--runtime-ca", str(tls.ca_cert), "--allowed-apps", str(allowed_apps),
            *(arg for sha in allow for arg in ("--allow-app", sha))]


def server_launcher_command(*, runtime: str, secret: Path, ca_cert: Path,
                            consortium: Path) -> list[str]:
    """The server host's ServerApp launcher (fedrad.launcher --consortium): only builds
    the coordinator's code-signing key signed run beside the model-signing key."""
    return [sys.executable, "-m", "fedrad.launcher", "--runtime-api-address", runtime,
            "--secret-file", str(secret), "--runtime-ca", str(ca_cert),
            "--consortium", str(consortium)]


def supernode_command(*, superlink: str, ca_cert: Path, auth_key: Path, port: int,
                      node_config: dict[str, Any], trusted_entities: Path | None = None,
                      superexec_secret: Path | None = None, max_retries: int = 20,
                      runtime_tls: RuntimeTLS | None = None) -> list[str]:
    """A SuperNode; with `trusted_entities` it runs only apps signed by those keys. With
    `superexec_secret` it launches no ClientApp itself (`--isolation process`): only a
    launcher holding that secret may claim its tasks (`launcher_command`); with
    `runtime_tls` its Runtime API speaks TLS with that certificate."""
    trust = ["--trusted-entities", str(trusted_entities)] if trusted_entities else []
    if superexec_secret is not None:
        trust += ["--isolation", "process", "--superexec-auth-secret-file",
                  str(superexec_secret)]
    if runtime_tls is not None:
        trust += ["--ssl-certfile", str(runtime_tls.cert), "--ssl-keyfile",
                  str(runtime_tls.key), "--ssl-ca-certfile", str(runtime_tls.ca_cert)]
    return [
        sys.executable, "-m", "fedrad.supernode",  # flower-supernode, waits shortened
        "--root-certificates", str(ca_cert), "--superlink", superlink,
        "--auth-supernode-private-key", str(auth_key),
        "--node-config", node_config_arg(node_config),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-retries", str(max_retries), "--max-wait-time", "120", *trust,
    ]

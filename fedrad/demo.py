"""`fedrad demo`: a whole federation on this host, from nothing to a report.

1. generate the built-in hospitals (or use `--data`: one sub-folder per site),
2. provision a consortium (CA, SuperLink certificate, one node key and kit per site) and
   sign the fedrad app,
3. start `fedrad server start` (TLS SuperLink, node authentication, signed-app registry)
   and one `fedrad site start --kit` per site (SuperNode running signed code only + worker),
4. submit the signed app with `flwr run @fedrad/fedrad==X.Y.Z`, show progress by round,
5. stop every process, whatever happens, and print the report's path.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad import processes as proc
from fedrad.app_registry import sign_app
from fedrad.consortium import add_site, init_consortium, startup_kit
from fedrad.runs import follow, load_run_config, rows, submit, toml_text
from fedrad.server_node import ServerHome

APP_DIR = Path(__file__).resolve().parents[1]
CONFIGS = APP_DIR / "configs"
FEDRAD = [sys.executable, "-m", "fedrad.cli"]  # the `fedrad` command of this installation
SITE_BUDGET = 20.0  # each demo site's own total privacy budget (node config epsilon-budget)


class DemoFailed(RuntimeError):
    """The run did not complete; the message says where its logs are."""


@dataclass(frozen=True)
class DemoResult:
    run_id: str
    run_dir: Path
    report: Path
    seconds: float
    rounds: list[dict[str, Any]]
    out: Path
    server_home: Path  # FEDRAD_SERVER_HOME: SuperLink state, runs, audit log


def discover_sites(data: Path) -> dict[str, Path]:
    """One site per sub-folder of `data` (names lower-cased to valid site ids)."""
    sites = {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        site = re.sub(r"[^a-z0-9_-]", "-", folder.name.lower())
        sites[site] = folder
    if not sites:
        raise DemoFailed(f"{data} has no sub-folders; expected one folder per site")
    return sites


def run_demo(out: Path, *, data: Path | None, config_file: Path, overrides: dict[str, Any],
             patients: int, say: Callable[[str], None],
             tick: Callable[[str], None] | None = None,
             budgets: dict[str, float] | None = None, workers: bool = True,
             launchers: bool = True, site_policy: dict[str, Any] | None = None) -> DemoResult:
    """Run the whole federation; every started process is stopped before returning.

    `budgets` sets a site's own total privacy budget (node config epsilon-budget;
    default SITE_BUDGET). `site_policy` adds policy keys (client.site_policy) to every
    site's node config: the sites refuse a run their policy does not allow. `workers`
    starts one site worker per site (client.worker) and
    `launchers` one warm ClientApp launcher per site (fedrad.launcher);
    bench/round_overhead.py turns them off to measure the difference.
    """
    start = time.monotonic()
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise DemoFailed(f"{out} is not empty; choose a new --out folder")
    if data is None:
        from fedrad.phantoms import write_consortium

        say(f"generating {patients} patients x 2 images per hospital (3 hospitals)")
        sites = write_consortium(out / "data", patients=patients, images_per_patient=2)
    else:
        sites = discover_sites(data)
    values = load_run_config(config_file, {"min-sites": len(sites),
                                           "min-train-sites": min(2, len(sites)), **overrides})
    run_config_file = out / "run-config.toml"
    run_config_file.parent.mkdir(parents=True, exist_ok=True)
    run_config_file.write_text(toml_text(values))

    say("provisioning the consortium (CA, SuperLink certificate, node keys, signed app)")
    port = proc.free_port()
    consortium = init_consortium(out / "consortium", "fedrad-demo", ["127.0.0.1", "localhost"],
                                 port)
    signed = sign_app(consortium.folder, APP_DIR)  # before the kits, which pin it
    kits = {}
    for site in sites:
        add_site(consortium, site)
        kits[site] = startup_kit(consortium, site)
    home = ServerHome(consortium.folder)
    logs = out / "logs"
    with proc.ProcessGroup() as group:
        say(f"starting the server: fedrad server start --port {port} (TLS, node "
            "authentication, signed-app registry)")
        server = group.start("server", [*FEDRAD, "server", "start", "--consortium",
                                        str(consortium.folder), "--port", str(port)],
                             log=logs / "server.log", cwd=out, env={}, grace=30.0)
        _wait_ready(home.ready, server, logs / "server.log")
        for site in sites:
            work = out / "sites" / site / "work"
            config = out / "sites" / site / "node-config.toml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(toml_text({
                "site-id": site, "data-dir": str(sites[site].resolve()), "work-dir": str(work),
                "epsilon-budget": (budgets or {}).get(site, SITE_BUDGET), "threads": 1,
                **(site_policy or {})}))
            group.start(f"site-{site}", [*FEDRAD, "site", "start", "--kit", str(kits[site]),
                                         "--config", str(config),
                                         *([] if workers else ["--no-worker"]),
                                         *([] if launchers else ["--no-warm-launcher"])],
                        log=logs / f"site-{site}.log", cwd=config.parent, env={}, grace=30.0)
        say(f"started {len(sites)} sites (fedrad site start --kit): {', '.join(sites)}")
        submitted = submit(home, values)
        run_id, run_dir = submitted.run_id, submitted.run_dir
        say(f"run {run_id} of {signed.spec()} submitted: {values['num-rounds']} rounds, DP "
            f"{'on' if values.get('dp-enabled', True) else 'OFF'}, secure aggregation "
            f"{'on' if values.get('secagg-enabled', True) else 'OFF'}")
        try:
            total = int(values["num-rounds"])
            status = follow(home, submitted, say, seen=0, tick=tick or (lambda _: None),
                            timeout=float(values.get("round-timeout", 900.0)) * (total + 1))
            recorded = rows(run_dir)
            registry = json.loads((run_dir / "registry.json").read_text())
            if "stopped_early" in registry:  # early-stop-patience: fewer rounds, on purpose
                total = int(registry["stopped_early"]["after_round"]) + 1
            if status != "finished:completed" or len(recorded) != total:
                raise DemoFailed(
                    f"run {run_id} ended as {status!r} after {len(recorded)}/{total} rounds; "
                    f"see the logs in {logs}, <consortium>/server/ and each site's work/logs/")
        finally:
            (logs / "serverapp.log").write_text(
                proc.flwr_cli(home.cli_home, "log", run_id, "--show"))
    report = run_dir / "report.html"
    return DemoResult(run_id=run_id, run_dir=run_dir, report=report,
                      seconds=time.monotonic() - start, rounds=recorded, out=out,
                      server_home=home.root)


def _wait_ready(ready: Path, server: subprocess.Popen[bytes], log: Path,
                timeout: float = 120.0) -> None:
    """Until `fedrad server start` has its SuperLink listening and the sites registered."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise DemoFailed(f"the server did not start (see {log}):\n{tail}")
        time.sleep(0.2)

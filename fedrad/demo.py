"""`fedrad demo`: a whole federation on this host, from nothing to a report.

1. generate the built-in hospitals (or use `--data`: one sub-folder per site),
2. provision a consortium (CA, SuperLink certificate, one node key per site),
3. start a TLS SuperLink with node authentication and one SuperNode per site,
4. submit the run with `flwr run` and show its progress round by round,
5. stop every process, whatever happens, and print the report's path.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.model_signing import SIGNING_KEY_ENV
from fedrad import processes as proc
from fedrad.consortium import add_site, init_consortium

APP_DIR = Path(__file__).resolve().parents[1]
CONFIGS = APP_DIR / "configs"
FEDERATION = "fedrad-demo"
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


def load_run_config(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read a configs/*.toml file, apply overrides, and validate (fail before starting)."""
    with path.open("rb") as handle:
        values = {**tomllib.load(handle), **overrides}
    RunConfig.from_mapping(values)
    return values


def _toml(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def discover_sites(data: Path) -> dict[str, Path]:
    """One site per sub-folder of `data` (names lower-cased to valid site ids)."""
    sites = {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        site = re.sub(r"[^a-z0-9_-]", "-", folder.name.lower())
        sites[site] = folder
    if not sites:
        raise DemoFailed(f"{data} has no sub-folders; expected one folder per site")
    return sites


def format_round(row: dict[str, Any], total: int) -> str:
    """One progress line: round, sites, loss, Dice, ε per site, wall vs slowest site."""
    sites = row["sites"]
    metric = row["score_metric"]
    score = ", ".join(f"{s} {v['evaluation'].get(metric, float('nan')):.3f}"
                      for s, v in sorted(sites.items()))
    loss = ", ".join(f"{s} {v['train'].get('train-loss', float('nan')):.3f}"
                     for s, v in sorted(sites.items()))
    eps = ", ".join(f"{s} {v['train']['epsilon-total']:.2f}"
                    for s, v in sorted(sites.items()) if "epsilon-total" in v["train"])
    return (
        f"round {row['server_round']}/{total} | sites {row['sites_trained']}/"
        f"{row['sites_expected']} | pooled {row['score_metric']} {row['pooled_score']:.3f}\n"
        f"    {metric}: {score}\n    train loss: {loss}\n    ε spent: {eps or 'DP off'}\n"
        f"    wall {row['wall_seconds']:.1f}s vs slowest site {row['slowest_site_seconds']:.1f}s "
        f"(overhead {row['overhead_seconds']:.1f}s)"
    )


def run_demo(out: Path, *, data: Path | None, config_file: Path, overrides: dict[str, Any],
             patients: int, say: Callable[[str], None],
             tick: Callable[[str], None] | None = None,
             budgets: dict[str, float] | None = None, workers: bool = True) -> DemoResult:
    """Run the whole federation; every started process is stopped before returning.

    `budgets` sets a site's own total privacy budget (node config epsilon-budget;
    default SITE_BUDGET). `workers` starts one site worker per site (client.worker);
    bench/round_overhead.py turns it off to measure the difference.
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
    values = load_run_config(config_file, {"min-sites": len(sites), **overrides})
    run_config_file = out / "run-config.toml"
    run_config_file.parent.mkdir(parents=True, exist_ok=True)
    run_config_file.write_text(_toml(values))

    say("provisioning the consortium (CA, SuperLink certificate, node keys)")
    consortium = init_consortium(out / "consortium", "fedrad-demo", ["127.0.0.1", "localhost"])
    keys = {site: add_site(consortium, site) for site in sites}
    port = proc.free_port()
    address = f"127.0.0.1:{port}"
    cli_home = out / "cli"
    proc.write_cli_config(cli_home, name=FEDERATION, address=address,
                          ca_cert=consortium.tls.ca_cert)
    logs = out / "logs"
    with proc.ProcessGroup() as group:
        for site in sites if workers else []:  # they import while the rest starts
            site_dir = out / "sites" / site
            group.start(f"worker-{site}", proc.worker_command(work_dir=site_dir / "work"),
                        log=logs / f"worker-{site}.log", cwd=site_dir, env={})
        say(f"starting SuperLink (TLS, node authentication) on {address}")
        server_dir = out / "server"
        superlink = group.start(
            "superlink",
            proc.superlink_command(port=port, ca_cert=consortium.tls.ca_cert,
                                   cert=consortium.tls.server_cert, key=consortium.tls.server_key,
                                   database=server_dir / "state.db"),
            log=logs / "superlink.log", cwd=server_dir,
            env={"FLWR_HOME": str(server_dir / "flwr"), "FEDRAD_SERVER_HOME": str(server_dir),
                 SIGNING_KEY_ENV: str(consortium.folder / "signing.key")},
        )
        proc.wait_for_port(port, 60, superlink, logs / "superlink.log")
        for site, site_keys in keys.items():
            proc.flwr_cli(cli_home, "supernode", "register", str(site_keys.public_key))
            site_dir = out / "sites" / site
            group.start(
                f"supernode-{site}",
                proc.supernode_command(
                    superlink=address, ca_cert=consortium.tls.ca_cert,
                    auth_key=site_keys.private_key, port=proc.free_port(),
                    node_config={"site-id": site, "data-dir": str(sites[site].resolve()),
                                 "work-dir": str(site_dir / "work"),
                                 "epsilon-budget": (budgets or {}).get(site, SITE_BUDGET),
                                 "model-verify-key": str(consortium.folder / "signing.pub"),
                                 "threads": 1},
                ),
                log=logs / f"supernode-{site}.log", cwd=site_dir,
                env={"FLWR_HOME": str(site_dir / "flwr")},
            )
        say(f"started {len(sites)} SuperNodes: {', '.join(sites)}")
        submitted = proc.flwr_json(cli_home, "run", str(APP_DIR), "--run-config",
                                   str(run_config_file))
        run_id = str(submitted["run-id"])
        run_dir = server_dir / "runs" / run_id
        say(f"run {run_id} submitted: {values['num-rounds']} rounds, DP "
            f"{'on' if values.get('dp-enabled', True) else 'OFF'}, SecAgg+ "
            f"{'on' if values.get('secagg-enabled', True) else 'OFF'}")
        try:
            rounds = _follow(cli_home, run_id, run_dir, int(values["num-rounds"]),
                             float(values.get("round-timeout", 900.0)), say,
                             tick or (lambda _: None))
        finally:
            (logs / "serverapp.log").write_text(proc.flwr_cli(cli_home, "log", run_id, "--show"))
    report = run_dir / "report.html"
    return DemoResult(run_id=run_id, run_dir=run_dir, report=report,
                      seconds=time.monotonic() - start, rounds=rounds, out=out)


def _follow(cli_home: Path, run_id: str, run_dir: Path, total: int, round_timeout: float,
            say: Callable[[str], None], tick: Callable[[str], None]) -> list[dict[str, Any]]:
    """Print each round as the server records it; return when Flower says the run ended."""
    seen = 0
    deadline = time.monotonic() + round_timeout * (total + 1)
    status = "pending"
    round_start = time.monotonic()
    while time.monotonic() < deadline:
        rows = _rows(run_dir)
        for row in rows[seen:]:
            say(format_round(row, total))
            round_start = time.monotonic()
        seen = len(rows)
        if seen < total:
            tick(f"round {seen + 1}/{total}: sites training and aggregating under SecAgg+ "
                 f"({time.monotonic() - round_start:.0f}s)")
        status = proc.run_status(cli_home, run_id)
        if status.startswith("finished"):
            break
        time.sleep(2.0)
    rows = _rows(run_dir)
    for row in rows[seen:]:
        say(format_round(row, total))
    if status != "finished:completed" or len(rows) != total:
        raise DemoFailed(
            f"run {run_id} ended as {status!r} after {len(rows)}/{total} rounds; "
            f"see the logs in {cli_home.parent / 'logs'}"
        )
    return rows


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

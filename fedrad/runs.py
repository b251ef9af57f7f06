"""`fedrad run ...`: a coordinator's runs on the consortium's SuperLink.

A run is launched from a config file (checked against the typed schema of
common.config before anything is sent), submitted as the consortium-signed app through
Flower's own CLI, and followed through the run folder the ServerApp writes
(`<server home>/runs/<id>/metrics.jsonl`). list / status / logs / stop wrap `flwr ls`,
`flwr log` and `flwr stop`; resume submits the same config again with `resume-from`, and
the ServerApp continues from the last checkpoint with the strategy's saved state.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import PHANTOM_PRIOR, ConfigError, RunConfig
from fedrad import processes as proc
from fedrad.app_registry import latest
from fedrad.server_node import ServerHome

APP_ID = "@fedrad/fedrad"


class RunError(RuntimeError):
    """A run command cannot do what was asked; the message says what to do."""


def load_run_config(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A configs/*.toml file with overrides applied, validated (ConfigError names the key)."""
    try:
        with path.open("rb") as handle:
            values = {**tomllib.load(handle), **overrides}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such run config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    RunConfig.from_mapping(values)
    return values


def toml_text(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Submitted:
    run_id: str
    run_dir: Path  # where the ServerApp records this run (its own, or the resumed one's)
    total_rounds: int


def submit(home: ServerHome, values: dict[str, Any]) -> Submitted:
    """Send the consortium-signed app with this run config to the SuperLink (an
    init-weights of "phantom-prior" made first: fedrad.pretrain.resolve_prior)."""
    if values.get("init-weights") == PHANTOM_PRIOR:  # torch is imported only then
        from fedrad.pretrain import resolve_prior

        values = resolve_prior(values, home.root / "priors")
    RunConfig.from_mapping(values)
    signed = latest(home.consortium, APP_ID)
    if signed is None:
        raise RunError(f"{home.consortium} has no signed app {APP_ID}; run "
                       "`fedrad consortium sign-app` first")
    if not home.cli_home.exists():
        raise RunError(f"{home.cli_home} does not exist: is `fedrad server start` running "
                       "for this consortium (and --state-dir the same)?")
    folder = home.root / "submitted"
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / time.strftime("run-%Y%m%d-%H%M%S.toml")
    config_file.write_text(toml_text(values))
    out = proc.flwr_json(home.cli_home, "run", signed.spec(), "--run-config", str(config_file))
    run_id = str(out["run-id"])
    config_file.rename(folder / f"{run_id}.toml")
    run_dir = home.root / "runs" / str(values.get("resume-from") or run_id)
    return Submitted(run_id, run_dir, int(values.get("num-rounds", 3)))


def find_run_dir(home: ServerHome, run_id: str) -> Path:
    """The run folder of a Flower run id: its own, or the run it resumed."""
    runs = home.root / "runs"
    if (runs / run_id / "registry.json").exists():
        return runs / run_id
    for registry in runs.glob("*/registry.json") if runs.exists() else []:
        resumed = json.loads(registry.read_text()).get("resumed", [])
        if any(entry["flwr_run_id"] == run_id for entry in resumed):
            return registry.parent
    raise RunError(f"run {run_id} has no run folder under {runs} (its ServerApp has not "
                   "started yet, or this is another server's run)")


def rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_round(row: dict[str, Any], total: int) -> str:
    """One progress block: sites counted, failures, score per site, loss, ε, timing."""
    sites = row["sites"]
    metric = row["score_metric"]
    score = ", ".join(f"{s} {v['evaluation'][metric]:.3f}" for s, v in sorted(sites.items())
                      if metric in v["evaluation"])
    loss = ", ".join(f"{s} {v['train']['train-loss']:.3f}"
                     for s, v in sorted(sites.items()) if "train-loss" in v["train"]) \
        or "kept at the sites (not DP-noised; node config share-train-loss)"
    eps = ", ".join(f"{s} {v['train']['epsilon-total']:.2f}"
                    for s, v in sorted(sites.items()) if "epsilon-total" in v["train"])
    failed = ", ".join(f"{s} {v['status']}" for s, v in sorted(sites.items())
                       if v["status"] != "ok")
    return (
        f"round {row['server_round']}/{total} | sites {row['sites_trained']}/"
        f"{row['sites_expected']} | pooled {metric} {row['pooled_score']:.3f}\n"
        f"    {metric}: {score or 'not evaluated this round'}\n    train loss: {loss}\n"
        f"    not counted: {failed or 'none'}\n    ε spent: {eps or 'DP off'}\n"
        f"    wall {row['wall_seconds']:.1f}s vs slowest site {row['slowest_site_seconds']:.1f}s "
        f"(overhead {row['overhead_seconds']:.1f}s, {row.get('exchanges', 1)} "
        f"exchange{'s' if row.get('exchanges', 1) != 1 else ''} with the sites)"
    )


def follow(home: ServerHome, submitted: Submitted, say: Callable[[str], None], *,
           timeout: float, tick: Callable[[str], None] = lambda _: None,
           seen: int | None = None) -> str:
    """Print each round as the ServerApp records it, until Flower says the run ended (or
    `timeout` passes); return Flower's status, e.g. 'finished:completed'."""
    done = len(rows(submitted.run_dir)) if seen is None else seen
    deadline = time.monotonic() + timeout
    status = "pending"
    round_start = time.monotonic()
    while time.monotonic() < deadline:
        current = rows(submitted.run_dir)
        for row in current[done:]:
            say(format_round(row, submitted.total_rounds))
            round_start = time.monotonic()
        done = max(done, len(current))
        tick(f"round {done + 1}/{submitted.total_rounds}: sites training "
             f"({time.monotonic() - round_start:.0f}s)")
        status = proc.run_status(home.cli_home, submitted.run_id)
        if status.startswith("finished"):
            break
        time.sleep(2.0)
    for row in rows(submitted.run_dir)[done:]:
        say(format_round(row, submitted.total_rounds))
    return status


def list_runs(home: ServerHome) -> list[dict[str, Any]]:
    """Flower's runs, with the rounds each has recorded in its run folder."""
    out = []
    for run in proc.flwr_json(home.cli_home, "ls")["runs"]:
        run_id = str(run["run-id"])
        try:
            run_dir = find_run_dir(home, run_id)
            done = len(rows(run_dir))
        except RunError:
            run_dir, done = None, 0
        app = f"{run.get('fab-id', '')}=={run.get('fab-version', '')}"
        out.append({"run_id": run_id, "status": run["status"], "app": app,
                    "pending_at": run.get("pending-at", ""), "rounds_done": done,
                    "run_dir": str(run_dir) if run_dir else ""})
    return out


def run_status(home: ServerHome, run_id: str) -> dict[str, Any]:
    """Flower's status and what the run folder says: rounds, participation, ε per site."""
    status = proc.run_status(home.cli_home, run_id)
    run_dir = find_run_dir(home, run_id)
    recorded = rows(run_dir)
    registry = json.loads((run_dir / "registry.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    epsilon = json.loads((run_dir / "epsilon.json").read_text()) \
        if (run_dir / "epsilon.json").exists() else {}
    return {
        "run_id": run_id, "status": status, "run_dir": str(run_dir),
        "folder_status": registry["status"], "strategy": config.get("strategy"),
        "rounds_done": len(recorded), "num_rounds": config.get("num-rounds"),
        "participation": participation(recorded), "epsilon": epsilon,
        "last": {"round": recorded[-1]["server_round"], "metric": recorded[-1]["score_metric"],
                 "pooled": recorded[-1]["pooled_score"]} if recorded else None,
        "resumed": registry.get("resumed", []),
    }


def participation(recorded: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Site → its status in each round ('-' where it was not part of the round)."""
    sites = sorted({s for row in recorded for s in row["sites"]})
    return {site: [row["sites"].get(site, {}).get("status", "-") for row in recorded]
            for site in sites}


def logs(home: ServerHome, run_id: str) -> str:
    return proc.flwr_cli(home.cli_home, "log", run_id, "--show")


def stop(home: ServerHome, run_id: str) -> None:
    proc.flwr_json(home.cli_home, "stop", run_id)
    home.audit.append("run-stop-requested", run_id=run_id)


def resume(home: ServerHome, run_id: str) -> Submitted:
    """Submit the run's own config again with resume-from: the ServerApp continues after
    the last checkpointed round, with the strategy state saved with it."""
    run_dir = find_run_dir(home, run_id)
    registry = json.loads((run_dir / "registry.json").read_text())
    if not registry["checkpoints"]:
        raise RunError(f"run {run_dir.name} has no checkpoint yet; launch it again instead")
    config = json.loads((run_dir / "config.json").read_text())
    last = max(int(r) for r in registry["checkpoints"])
    if last >= int(config["num-rounds"]):
        raise RunError(f"run {run_dir.name} already has all {last} rounds")
    for flwr_id in {run_id, run_dir.name, *(e["flwr_run_id"] for e in
                                           registry.get("resumed", []))}:
        try:
            if not proc.run_status(home.cli_home, flwr_id).startswith("finished"):
                stop(home, flwr_id)  # its ServerApp is gone; let Flower know
        except proc.DeploymentError:
            pass
    return submit(home, {**config, "resume-from": run_dir.name})

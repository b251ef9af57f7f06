"""Secure aggregation with a site killed mid-round, in real processes: four sites started
by `fedrad site start --kit`; once the fourth has sent its key advert, its node is
stopped, so it is in the round's set (every other site masked with it) but never answers.
The three survivors re-mask their cached updates among themselves once (the recovery),
the round completes from them, every survivor's audit log names the site the server
called dropped, and the round records the exchanges it took."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from fedrad import processes as proc
from fedrad.app_registry import sign_app
from fedrad.consortium import add_site, init_consortium, startup_kit
from fedrad.demo import APP_DIR, CONFIGS, load_run_config
from fedrad.server_node import ServerHome

FEDRAD = [sys.executable, "-m", "fedrad.cli"]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(0.2)


@pytest.mark.deployment
def test_a_site_killed_mid_round_is_survived_by_one_recovery(tmp_path, phantom_sites) -> None:
    data = {"site-1": "hospital-a", "site-2": "hospital-b", "site-3": "hospital-c",
            "site-4": "hospital-a"}
    port = proc.free_port()
    consortium = init_consortium(tmp_path / "consortium", "dropout", ["127.0.0.1"], port)
    signed = sign_app(consortium.folder, APP_DIR)  # before the kits, which pin it
    kits = {}
    for site in data:
        add_site(consortium, site)
        kits[site] = startup_kit(consortium, site)
    home = ServerHome(consortium.folder)
    with proc.ProcessGroup() as group:
        server = group.start("server", [*FEDRAD, "server", "start", "--consortium",
                                        str(consortium.folder), "--port", str(port)],
                             log=tmp_path / "server.log", cwd=tmp_path, env={}, grace=30.0)
        _wait(lambda: home.ready.exists() or server.poll() is not None, 90, "server ready")
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        sites = {site: group.start(site, [*FEDRAD, "site", "start", "--kit", str(kits[site]),
                                          "--data", str(phantom_sites[data[site]]),
                                          "--work-dir", str(tmp_path / site),
                                          "--epsilon-budget", "50"],
                                   log=tmp_path / f"{site}.log", cwd=tmp_path, env={},
                                   grace=30.0)
                 for site in data}
        _wait(lambda: sum(n["status"] == "online" for n in proc.flwr_json(
            home.cli_home, "supernode", "ls")["nodes"]) == 4, 120, "four sites online")
        values = load_run_config(CONFIGS / "demo.toml", {
            "num-rounds": 1, "min-sites": 4, "image-size": 32, "local-epochs": 1,
            "round-timeout": 45.0})
        config = tmp_path / "run.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        run_id = str(proc.flwr_json(home.cli_home, "run", signed.spec(), "--run-config",
                                    str(config))["run-id"])
        log_4 = tmp_path / "site-4" / "logs" / "supernode.log"
        _wait(lambda: log_4.exists() and log_4.read_text().count("Sent successfully") >= 1,
              240, "site-4 to send its key advert")
        # killed, not stopped: a stopped SuperNode unregisters and the SuperLink drops
        # the advert it had just sent, so site-4 would never be in the round's set
        os.killpg(os.getpgid(sites["site-4"].pid), signal.SIGKILL)
        _wait(lambda: proc.run_status(home.cli_home, run_id).startswith("finished"), 300,
              "the round to finish without site-4")
        assert proc.run_status(home.cli_home, run_id) == "finished:completed"
    rows = [json.loads(x) for x in
            (home.root / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["secagg"] is True
    statuses = {site: v["status"] for site, v in rows[0]["sites"].items()}
    assert statuses == {"site-1": "ok", "site-2": "ok", "site-3": "ok", "site-4": "no-reply"}
    assert rows[0]["sites_trained"] == 3 and rows[0]["update_norm"] > 0
    assert rows[0]["exchanges"] == 4  # key adverts, training, recovery, last evaluation
    for site in ("site-1", "site-2", "site-3"):
        audit = [json.loads(line) for line in
                 (tmp_path / site / "audit.jsonl").read_text().splitlines()]
        (recovery,) = [e for e in audit if e["event"] == "secagg-recovery"]
        assert recovery["dropped"] == ["site-4"] and recovery["survivors"] == 3

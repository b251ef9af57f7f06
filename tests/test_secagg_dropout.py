"""SecAgg+ with a site stopped after key sharing, in real processes: four sites started by
`fedrad site start --kit`; once the fourth has sent its key shares (its second reply of the
round), its node is stopped. The round completes with the other three from the shares they
hold (reconstruction threshold 3 of 4), and the stopped site is recorded as dropped."""

from __future__ import annotations

import json
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
def test_a_site_stopped_after_key_sharing_is_survived(tmp_path, phantom_sites) -> None:
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
        _wait(lambda: log_4.exists() and log_4.read_text().count("Sent successfully") >= 2,
              240, "site-4 to send its public keys and its key shares")
        group.stop(sites["site-4"])
        _wait(lambda: proc.run_status(home.cli_home, run_id).startswith("finished"), 300,
              "the round to finish without site-4")
        assert proc.run_status(home.cli_home, run_id) == "finished:completed"
    rows = [json.loads(x) for x in
            (home.root / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["secagg"] is True
    statuses = {site: v["status"] for site, v in rows[0]["sites"].items()}
    assert statuses == {"site-1": "ok", "site-2": "ok", "site-3": "ok", "site-4": "dropped"}
    assert rows[0]["sites_trained"] == 3 and rows[0]["update_norm"] > 0

"""A coordinator's runs in real processes: `fedrad run launch/status/list/logs/resume` and
`fedrad models` against `fedrad server start` and three `fedrad site start` (TLS, node
authentication, signed app), with a site killed mid-round and the ServerApp killed
between rounds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fedrad import processes as proc
from fedrad.app_registry import sign_app
from fedrad.consortium import add_site, init_consortium, startup_kit
from fedrad.demo import APP_DIR, CONFIGS
from fedrad.server_node import ServerHome
from server.registry import RunFolder

FEDRAD = [sys.executable, "-m", "fedrad.cli"]
DATA = {"site-1": "hospital-a", "site-2": "hospital-b", "site-3": "hospital-c"}
SETS = ["num-rounds=4", "min-sites=3", "min-train-sites=2", "secagg-enabled=false",
        "image-size=32", "local-epochs=1", "round-timeout=30.0", "learning-rate=0.01"]
# These sites allow the deliberate no-SecAgg (and, for the resume test, no-DP) runs.
POLICY = ["--site-policy", "require-secure-aggregation=false", "--site-policy",
          "require-dp=false"]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(0.3)


def _fedrad(*args: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDRAD, *args, "--consortium", str(folder)], capture_output=True,
                          text=True, timeout=300, check=False, env=proc.child_env({}))


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text()
                                               .rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def _serverapp_pids(server_pid: int) -> list[int]:
    """The ServerApp processes: children that the server host's launcher forked (the
    launcher runs signed ServerApps only; a fork keeps its command line)."""
    out = []
    for pid in _children(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fedrad.launcher" in cmdline and b"--consortium" in cmdline:
            out += _children(pid)
    return out


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def federation(tmp_path_factory, phantom_sites):
    tmp = tmp_path_factory.mktemp("lifecycle")
    port = proc.free_port()
    consortium = init_consortium(tmp / "consortium", "lifecycle", ["127.0.0.1"], port)
    sign_app(consortium.folder, APP_DIR)  # before the kits, which pin it
    kits = {}
    for site in DATA:
        add_site(consortium, site)
        kits[site] = startup_kit(consortium, site)
    home = ServerHome(consortium.folder)
    with proc.ProcessGroup() as group:
        server = group.start("server", [*FEDRAD, "server", "start", "--consortium",
                                        str(consortium.folder), "--port", str(port)],
                             log=tmp / "server.log", cwd=tmp, env={}, grace=30.0)
        _wait(lambda: home.ready.exists() or server.poll() is not None, 90, "server ready")
        assert server.poll() is None, (tmp / "server.log").read_text()

        def start_site(site: str) -> subprocess.Popen[bytes]:
            return group.start(site, [*FEDRAD, "site", "start", "--kit", str(kits[site]),
                                      "--data", str(phantom_sites[DATA[site]]),
                                      "--work-dir", str(tmp / site), "--epsilon-budget", "200",
                                      *POLICY],
                               log=tmp / f"{site}.log", cwd=tmp, env={}, grace=30.0)

        sites = {site: start_site(site) for site in DATA}
        _wait(lambda: _online({"home": home}) == 3, 120, "three sites online")
        yield {"home": home, "folder": consortium.folder, "server": server, "sites": sites,
               "start_site": start_site, "tmp": tmp}


def _launch(federation, *extra: str) -> tuple[str, Path]:
    sets = [x for pair in ([("--set", s) for s in [*SETS, *extra]]) for x in pair]
    out = _fedrad("run", "launch", str(CONFIGS / "demo.toml"), *sets, "--detach", "--json",
                  folder=federation["folder"])
    assert out.returncode == 0, out.stdout + out.stderr
    launched = json.loads(out.stdout)  # one JSON object on stdout, nothing else
    run_id = launched["run_id"]
    assert launched["status"] == "submitted"
    assert launched["folder"] == str(federation["home"].root / "runs" / run_id)
    return run_id, federation["home"].root / "runs" / run_id


def _online(federation) -> int:
    nodes = proc.flwr_json(federation["home"].cli_home, "supernode", "ls")["nodes"]
    return sum(n["status"] == "online" for n in nodes)


def _finished(federation, run_id: str) -> str:
    return proc.run_status(federation["home"].cli_home, run_id)


@pytest.mark.deployment
def test_a_site_killed_mid_round_is_recorded_and_rejoins_later(federation) -> None:
    run_id, run_dir = _launch(federation, "num-rounds=6")
    # site-3 dies as its SuperNode takes round 2's training request: its ClientApp has
    # seconds of training ahead, so the round's update never leaves it.
    log = federation["tmp"] / "site-3" / "logs" / "supernode.log"
    taken = re.compile(rf"RUN {run_id}, ROUND 2\][^\n]*\n[^\n]*Receiving: train message")
    _wait(lambda: log.exists() and bool(taken.search(log.read_text(errors="replace"))), 240,
          "site-3 taking round 2's training request")
    site_3 = federation["sites"]["site-3"]
    for pid in [site_3.pid, *_children(site_3.pid)]:  # the host dies: SuperNode, worker, all
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a ClientApp process that had just finished
            continue
    site_3.wait(timeout=30)
    # Restarted at once, the site is refused until the SuperLink marks the dead node offline
    # (two missed heartbeats: 30 to 60 s from now); `fedrad site start` waits that out.
    federation["sites"]["site-3"] = federation["start_site"]("site-3")
    _wait(lambda: _finished(federation, run_id).startswith("finished"), 600, "the run")
    assert _finished(federation, run_id) == "finished:completed"
    rows = _rows(run_dir)
    assert [r["server_round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    site_3_rounds = [r["sites"].get("site-3", {}).get("status", "-") for r in rows]
    assert site_3_rounds[0] == "ok" and site_3_rounds[1] != "ok"
    assert rows[1]["sites_trained"] == 2
    assert all(rows[i]["sites"][s]["status"] == "ok" for i in range(6)
               for s in ("site-1", "site-2"))
    # Rounds take seconds, the dead node stays listed for up to a minute: the site is back
    # once its new SuperNode is activated (a second "SuperNode ID" in its log), and the
    # next run counts it in every round.
    _wait(lambda: log.read_text(errors="replace").count("SuperNode ID") >= 2, 240,
          "site-3 back")
    assert federation["sites"]["site-3"].poll() is None, "the restarted site gave up"
    assert "connecting again" in (federation["tmp"] / "site-3.log").read_text()
    next_id, next_dir = _launch(federation, "num-rounds=2")
    _wait(lambda: _finished(federation, next_id).startswith("finished"), 600, "next run")
    assert [r["sites"]["site-3"]["status"] for r in _rows(next_dir)] == ["ok", "ok"]
    status = _fedrad("run", "status", run_id, "--json", folder=federation["folder"])
    assert status.returncode == 0, status.stderr
    table = json.loads(status.stdout)
    assert table["participation"]["site-3"] == site_3_rounds
    assert table["rounds_done"] == 6 and table["folder_status"] == "completed"
    assert set(table["epsilon"]) == set(DATA)  # DP on: ε per site recorded
    listed = json.loads(_fedrad("run", "list", "--json", folder=federation["folder"]).stdout)
    assert {"run_id": run_id, "rounds_done": 6}.items() <= next(
        r for r in listed if r["run_id"] == run_id).items()
    logs = _fedrad("run", "logs", run_id, folder=federation["folder"])
    assert "round 6/6" in logs.stdout

    # The dashboard of the live server: every site online again, this run listed.
    port = proc.free_port()
    with proc.ProcessGroup() as group:
        group.start("dashboard", [*FEDRAD, "server", "dashboard", "--consortium",
                                  str(federation["folder"]), "--port", str(port)],
                    log=federation["tmp"] / "dashboard.log", cwd=federation["tmp"], env={})
        proc.wait_for_port(port, 60)
        index = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
    for site in DATA:
        assert re.search(rf"<td>{site}</td><td>\d+</td><td>[^<]*</td><td>online</td>", index), \
            index
    assert f"/runs/{run_id}" in index


@pytest.mark.deployment
def test_a_killed_serverapp_resumes_to_the_uninterrupted_model(federation, tmp_path) -> None:
    extra = ("strategy=fedadam", "server-learning-rate=0.02", "dp-enabled=false",
             "evaluate-every=2")
    whole_id, whole_dir = _launch(federation, *extra)
    _wait(lambda: _finished(federation, whole_id).startswith("finished"), 600, "whole run")
    assert _finished(federation, whole_id) == "finished:completed"

    cut_id, cut_dir = _launch(federation, *extra)
    _wait(lambda: RunFolder(cut_dir).last_round() >= 2 if (cut_dir / "registry.json").exists()
          else False, 300, "round 2's checkpoint")
    pids = _serverapp_pids(federation["server"].pid)
    assert pids, "no ServerApp process under the server's launcher"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert RunFolder(cut_dir).last_round() < 4

    resumed = _fedrad("run", "resume", cut_id, "--detach", folder=federation["folder"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_id = resumed.stdout.split()[-1]
    _wait(lambda: _finished(federation, new_id).startswith("finished"), 600, "resumed run")
    assert _finished(federation, new_id) == "finished:completed"

    registry = json.loads((cut_dir / "registry.json").read_text())
    assert registry["status"] == "completed"
    assert registry["resumed"][0]["flwr_run_id"] == new_id
    assert [r["server_round"] for r in _rows(cut_dir)] == [1, 2, 3, 4]
    whole = RunFolder(whole_dir).load_checkpoint(4)
    cut = RunFolder(cut_dir).load_checkpoint(4)
    # Same seed, same per-round site seeds, updates summed in node order and FedAdam's
    # moments restored from round 2: the models agree to float32 rounding of the sites'
    # CPU kernels (exact equality is not promised across processes).
    for name, tensor in whole.items():
        torch.testing.assert_close(cut[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    fresh_adam = json.loads((cut_dir / "config.json").read_text())["strategy"]
    assert fresh_adam == "fedadam"

    # The registry: list, show and a signed export that loads with MONAI alone.
    models = json.loads(_fedrad("models", "list", "--json", folder=federation["folder"]).stdout)
    assert f"{cut_dir.name}:4" in {m["name"] for m in models}
    shown = json.loads(_fedrad("models", "show", f"{cut_dir.name}:4",
                               folder=federation["folder"]).stdout)
    assert shown["architecture"]["class"] == "monai.networks.nets.unet.UNet"
    assert shown["strategy"] == "fedadam" and shown["round"] == 4
    out = tmp_path / "export"
    exported = _fedrad("models", "export", cut_dir.name, "--out", str(out),
                       folder=federation["folder"])
    assert exported.returncode == 0, exported.stderr
    loader = ("import sys, json, importlib, torch; d = json.load(open(sys.argv[1] + "
              "'/model.json')); m, _, c = d['architecture']['class'].rpartition('.'); "
              "net = getattr(importlib.import_module(m), c)(**d['architecture']['kwargs']); "
              "net.load_state_dict(torch.load(sys.argv[1] + '/model.pt', weights_only=True)); "
              "net.eval(); x = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32); "
              "print(float(net(x).sum())); "
              "print([k for k in sys.modules if k.split('.')[0] in "
              "('fedrad', 'server', 'client', 'common')])")
    plain = subprocess.run([sys.executable, "-c", loader, str(out)], capture_output=True,
                           text=True, timeout=120, check=True, cwd=tmp_path,
                           env={"PATH": os.environ["PATH"]})
    total, loaded = plain.stdout.splitlines()
    assert loaded == "[]"  # nothing of fedrad was imported to load it
    from fedrad.model_registry import load_exported

    x = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32)
    with torch.no_grad():
        assert abs(float(load_exported(out)(x).sum()) - float(total)) < 1e-3


@pytest.mark.deployment
def test_a_killed_server_host_restarts_and_resumes_to_the_uninterrupted_model(
        federation) -> None:
    """The whole server host dies mid-run (SuperLink, Fleet gateway, launcher and
    ServerApp, SIGKILL): `fedrad server start` again on the same state folder, the sites
    reconnect by themselves, and `fedrad run resume` ends equal to an uninterrupted run.
    Runs last in this module: it replaces the fixture's server."""
    extra = ("dp-enabled=false", "evaluate-every=1")
    whole_id, whole_dir = _launch(federation, *extra)
    _wait(lambda: _finished(federation, whole_id).startswith("finished"), 600, "whole run")
    assert _finished(federation, whole_id) == "finished:completed"

    cut_id, cut_dir = _launch(federation, *extra)
    _wait(lambda: RunFolder(cut_dir).last_round() >= 2 if (cut_dir / "registry.json").exists()
          else False, 300, "round 2's checkpoint")
    server = federation["server"]
    for pid in [server.pid, *_children(server.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    server.wait(timeout=30)
    assert RunFolder(cut_dir).last_round() < 4

    home, tmp = federation["home"], federation["tmp"]
    home.ready.unlink(missing_ok=True)  # a killed server leaves its ready file behind
    port = json.loads((federation["folder"] / "consortium.json").read_text())["superlink"]
    restarted = subprocess.Popen(
        [*FEDRAD, "server", "start", "--consortium", str(federation["folder"]), "--port",
         port.rpartition(":")[2]], stdout=(tmp / "server-2.log").open("wb"),
        stderr=subprocess.STDOUT, cwd=tmp, env=proc.child_env({}), start_new_session=True)
    federation["server"] = restarted
    try:
        _wait(lambda: home.ready.exists() or restarted.poll() is not None, 90,
              "the restarted server")
        assert restarted.poll() is None, (tmp / "server-2.log").read_text()
        _wait(lambda: _online(federation) == 3, 240, "the sites to reconnect")
        resumed = _fedrad("run", "resume", cut_id, "--detach", folder=federation["folder"])
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        new_id = resumed.stdout.split()[-1]
        _wait(lambda: _finished(federation, new_id).startswith("finished"), 600,
              "resumed run")
        assert _finished(federation, new_id) == "finished:completed"
    finally:
        restarted.terminate()
        restarted.wait(timeout=60)
    assert [r["server_round"] for r in _rows(cut_dir)] == [1, 2, 3, 4]
    assert all(r["sites_trained"] == 3 for r in _rows(cut_dir))
    whole = RunFolder(whole_dir).load_checkpoint(4)
    cut = RunFolder(cut_dir).load_checkpoint(4)
    for name, tensor in whole.items():
        torch.testing.assert_close(cut[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

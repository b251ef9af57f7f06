"""A federation across separate network stacks: the server in one Linux network namespace,
each site in its own, joined by veth links, TLS over the veth addresses.

Shows that (1) the federation runs across network stacks with the deploy commands
(`fedrad server start --host 0.0.0.0`, `fedrad site start --superlink <server ip>`),
(2) a site needs nothing but outbound access to the server's port: no site listens on
anything but loopback, and the server cannot open a connection to any site, and (3) a
site whose link is cut mid-round is survived: the round completes with the others and the
run finishes. Needs root and `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrad import processes as proc
from fedrad.app_registry import sign_app
from fedrad.consortium import add_site, export_server, init_consortium, startup_kit
from fedrad.demo import APP_DIR, CONFIGS, load_run_config
from fedrad.server_node import ServerHome

PORT = 9092
SITES = ("hospital-a", "hospital-b", "hospital-c")
TAG = f"{os.getpid() % 100000}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)


def _why_not() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = _ip("netns", "add", f"fr-probe-{TAG}")
    if probe.returncode != 0:
        return f"`ip netns add` is not permitted here: {probe.stderr.strip()}"
    _ip("netns", "del", f"fr-probe-{TAG}")
    return None


pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _must(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


def _ns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


class Network:
    """Namespace fr-srv-TAG for the server and one per site, a veth link each:
    server 10.213.<i>.1 <-> site i 10.213.<i>.2."""

    def __init__(self) -> None:
        self.server = f"fr-srv-{TAG}"
        self.sites = {site: f"fr-{i}-{TAG}" for i, site in enumerate(SITES, 1)}
        self.links = {site: f"fc{i}-{TAG}" for i, site in enumerate(SITES, 1)}
        self.server_ip = {site: f"10.213.{i}.1" for i, site in enumerate(SITES, 1)}
        self.site_ip = {site: f"10.213.{i}.2" for i, site in enumerate(SITES, 1)}

    def __enter__(self) -> Network:
        for name in (self.server, *self.sites.values()):
            _must("netns", "add", name)
            _must("-n", name, "link", "set", "lo", "up")
        for i, site in enumerate(SITES, 1):
            outer = f"fs{i}-{TAG}"
            _must("link", "add", outer, "type", "veth", "peer", "name", self.links[site])
            _must("link", "set", outer, "netns", self.server)
            _must("link", "set", self.links[site], "netns", self.sites[site])
            _must("-n", self.server, "addr", "add", f"{self.server_ip[site]}/24", "dev", outer)
            _must("-n", self.sites[site], "addr", "add", f"{self.site_ip[site]}/24", "dev",
                  self.links[site])
            _must("-n", self.server, "link", "set", outer, "up")
            _must("-n", self.sites[site], "link", "set", self.links[site], "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for name in (self.server, *self.sites.values()):
            _ip("netns", "del", name)

    def cut(self, site: str, up: bool = False) -> None:
        _must("-n", self.sites[site], "link", "set", self.links[site], "up" if up else "down")


def _listening(namespace: str) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket in a namespace."""
    out = subprocess.run([*_ns(namespace), "ss", "-Hltn"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        found.append((address.strip("[]"), int(port)))
    return found


def _flwr(net: Network, home: ServerHome, *args: str) -> dict:
    result = subprocess.run(
        [*_ns(net.server), str(proc.BIN / "flwr"), *args, "--format", "json"],
        env=proc.child_env({"FLWR_HOME": str(home.cli_home)}), capture_output=True,
        text=True, timeout=120, check=False)
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data.get("success"), result.stdout + result.stderr
    return dict(data)


RAW_REQUEST = """
import ssl, sys, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
codes = []
for path in sys.argv[3:]:
    request = urllib.request.Request(sys.argv[1] + path, data=b"", method="POST")
    try:
        codes.append(urllib.request.urlopen(request, context=context, timeout=10).status)
    except urllib.error.HTTPError as exc:
        codes.append(exc.code)
print(" ".join(map(str, codes)))
"""


def _control_plane_is_closed(net: Network, site: str, tmp_path: Path, kit: Path) -> None:
    """`flwr ls`, `flwr supernode register` and `flwr run` from `site`'s namespace fail
    against the server's public address; raw requests to the control and runtime routes
    get 404; the Fleet API still answers (a 4xx for an unsigned request, not a 404)."""
    from fedrad.kit import open_kit

    ca = tmp_path / "outsider-ca.pem"
    ca.write_bytes(open_kit(kit, None).files["ca.pem"])
    home = tmp_path / "outsider-cli"
    address = f"{net.server_ip[site]}:{PORT}"
    proc.write_cli_config(home, name="public", address=address, ca_cert=ca)
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    from common.pki import create_node_keys

    key = create_node_keys(impostor, "impostor").public_key
    run_config = tmp_path / "outsider.toml"
    run_config.write_text("num-rounds = 1\n")
    for args in (("ls",), ("supernode", "register", str(key)),
                 ("run", "@fedrad/fedrad==0.1.0", "--run-config", str(run_config))):
        result = subprocess.run(
            [*_ns(net.sites[site]), str(proc.BIN / "flwr"), *args, "--format", "json"],
            env=proc.child_env({"FLWR_HOME": str(home)}), capture_output=True, text=True,
            timeout=120, check=False)
        out = result.stdout
        assert result.returncode != 0 or '"success": false' in out.replace("\n", " "), (
            args, out)
    paths = ["/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes",
             "/v1/fleet/register-node", "/docs", "/v1/fleet/get-run"]
    codes = subprocess.run(
        [*_ns(net.sites[site]), sys.executable, "-c", RAW_REQUEST, f"https://{address}",
         str(ca), *paths], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert codes[:5] == ["404"] * 5, codes
    assert codes[5] != "404" and codes[5].startswith("4"), codes  # reached, unauthenticated


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(0.5)


def test_a_federation_across_network_namespaces(tmp_path, phantom_sites) -> None:
    fedrad = [sys.executable, "-m", "fedrad.cli"]
    with Network() as net, proc.ProcessGroup() as group:
        consortium = init_consortium(tmp_path / "consortium", "netns",
                                     [net.server_ip[s] for s in SITES] + ["127.0.0.1"], PORT)
        signed = sign_app(consortium.folder, APP_DIR)  # before the kits, which pin it
        kits = {}
        for site in SITES:
            add_site(consortium, site)
            kits[site] = startup_kit(consortium, site)
        bundle = tmp_path / "server-bundle"  # what a server host gets: no CA private key
        export_server(consortium, bundle)
        state = tmp_path / "server-state"
        home = ServerHome(bundle, state)
        server = group.start("server", [*_ns(net.server), *fedrad, "server", "start",
                                        "--consortium", str(bundle), "--state-dir",
                                        str(state), "--host", "0.0.0.0", "--port", str(PORT)],
                             log=tmp_path / "server.log", cwd=tmp_path, env={}, grace=30.0)
        _wait(lambda: home.ready.exists() or server.poll() is not None, 90, "server ready")
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        for site in SITES:
            group.start(site, [*_ns(net.sites[site]), *fedrad, "site", "start",
                               "--kit", str(kits[site]), "--data", str(phantom_sites[site]),
                               "--work-dir", str(tmp_path / site), "--epsilon-budget", "50",
                               # a round may go on with two of the three (one link cut)
                               "--site-policy", "min-secure-aggregation-sites=2",
                               "--superlink", f"{net.server_ip[site]}:{PORT}"],
                        log=tmp_path / f"{site}.log", cwd=tmp_path, env={}, grace=30.0)
        _wait(lambda: sum(n["status"] == "online"
                          for n in _flwr(net, home, "supernode", "ls")["nodes"]) == 3,
              120, "three sites online across the veth links")

        # (2) Only the server's port faces the network; no site accepts connections.
        server_listening = _listening(net.server)
        assert ("0.0.0.0", PORT) in server_listening or ("*", PORT) in server_listening
        assert all(a in {"127.0.0.1", "::1"} for a, p in server_listening if p != PORT)
        for site in SITES:
            listening = _listening(net.sites[site])
            assert listening and all(a in {"127.0.0.1", "::1"} for a, _ in listening), listening
            for _, port in listening:
                reach = subprocess.run(
                    [*_ns(net.server), sys.executable, "-c",
                     "import socket,sys; s=socket.socket(); s.settimeout(3); "
                     f"sys.exit(s.connect_ex(('{net.site_ip[site]}', {port})))"],
                    timeout=30, check=False)
                assert reach.returncode != 0, f"server reached {site}:{port}"

        # (2b) From a hospital's namespace, with the CA every kit carries, the control
        # plane is out of reach on the server's public address; the Fleet API answers.
        _control_plane_is_closed(net, "hospital-a", tmp_path, kits["hospital-a"])

        values = load_run_config(CONFIGS / "demo.toml", {
            "num-rounds": 2, "min-sites": 2, "secagg-allow-fewer-sites": True,
            "secagg-min-sites": 2,  # the survivors of the cut may recover the round
            "image-size": 32, "local-epochs": 2,
            "round-timeout": 45.0})
        config = tmp_path / "run.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        run_id = str(_flwr(net, home, "run", signed.spec(), "--run-config", str(config))
                     ["run-id"])
        run_dir = state / "runs" / run_id

        # (3) Cut hospital-c's link once its first round-1 message has arrived.
        log_c = tmp_path / "hospital-c" / "logs" / "supernode.log"
        _wait(lambda: log_c.exists() and "Receiving: train message" in log_c.read_text(), 240,
              "round 1 to reach hospital-c")
        net.cut("hospital-c")
        _wait(lambda: len(_rows(run_dir)) >= 1, 400, "round 1 to complete without hospital-c")
        net.cut("hospital-c", up=True)
        _wait(lambda: _flwr(net, home, "ls", "--run-id", run_id)["runs"][0]["status"]
              .startswith("finished"), 400, "the run to finish")
        status = _flwr(net, home, "ls", "--run-id", run_id)["runs"][0]["status"]
        rows = _rows(run_dir)
        assert status == "finished:completed" and len(rows) == 2, (status, rows)
        first = rows[0]
        assert set(first["sites"]) == set(SITES)  # named by their registered node keys
        assert first["sites"]["hospital-c"]["status"] == "no-reply"
        assert first["exchanges"] == 3  # key adverts, training, the survivors' recovery
        assert first["sites_trained"] == 2
        for site in ("hospital-a", "hospital-b"):
            assert first["sites"][site]["status"] == "ok"
        assert all(row["update_norm"] > 0 for row in rows)
        assert not any(p.poll() is not None for name, p in group.processes if name != "server")
        print(json.dumps([{s: v["status"] for s, v in row["sites"].items()} for row in rows]))
    for name in (net.server, *net.sites.values()):
        assert name not in _ip("netns", "list").stdout  # nothing left behind


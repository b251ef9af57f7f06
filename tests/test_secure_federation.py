"""Who may join and what code may run, with real processes on 127.0.0.1.

`fedrad server start` (TLS SuperLink, node authentication, signed-app registry) and
`fedrad site start --kit` as the product runs them; the refused parties are real
SuperNodes with the wrong key, no TLS, another consortium's CA, or apps that the
consortium did not sign.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

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
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _nodes(home: ServerHome) -> dict[str, str]:
    """node id → status, as the SuperLink reports it."""
    data = proc.flwr_json(home.cli_home, "supernode", "ls")
    return {n["node-id"]: n["status"] for n in data["nodes"]}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, phantom_sites):
    """One consortium server and one site (hospital-a), both started by the fedrad CLI."""
    out = tmp_path_factory.mktemp("secure")
    port = proc.free_port()
    consortium = init_consortium(out / "consortium", "secure", ["127.0.0.1"], port)
    signed = sign_app(consortium.folder, APP_DIR)  # before the kit, which pins it
    add_site(consortium, "hospital-a")
    kit = startup_kit(consortium, "hospital-a")
    home = ServerHome(consortium.folder)
    with proc.ProcessGroup() as group:
        server = group.start("server", [*FEDRAD, "server", "start", "--consortium",
                                        str(consortium.folder), "--port", str(port)],
                             log=out / "server.log", cwd=out, env={}, grace=30.0)
        _wait(lambda: home.ready.exists() or server.poll() is not None, 90, "server ready")
        assert server.poll() is None, (out / "server.log").read_text()
        work = out / "site-a"
        site = group.start("site", [*FEDRAD, "site", "start", "--kit", str(kit), "--data",
                                    str(phantom_sites["hospital-a"]), "--work-dir", str(work),
                                    "--epsilon-budget", "50",
                                    "--site-policy", "require-secure-aggregation=false"],
                           log=out / "site.log", cwd=out, env={}, grace=30.0)
        node_id = json.loads(home.nodes.read_text())["hospital-a"]["node_id"]
        _wait(lambda: _nodes(home).get(node_id) == "online" or site.poll() is not None, 90,
              "hospital-a online")
        assert site.poll() is None, (out / "site.log").read_text()
        # private whatever the umask: the work folder, its logs, the server's state
        assert oct(work.stat().st_mode & 0o777) == "0o700"
        assert oct((work / "logs" / "supernode.log").stat().st_mode & 0o777) == "0o600"
        assert oct((home.root / "superlink.log").stat().st_mode & 0o777) == "0o600"
        yield {"out": out, "port": port, "consortium": consortium, "home": home,
               "group": group, "work": work, "node_id": node_id, "signed": signed,
               "server": server, "sites": phantom_sites}


@pytest.mark.deployment
def test_only_registered_nodes_over_tls_from_the_consortium_ca_join(federation) -> None:
    consortium, home, port = federation["consortium"], federation["home"], federation["port"]
    out, group = federation["out"], federation["group"]
    address = f"127.0.0.1:{port}"
    add_site(consortium, "intruder")  # a key the SuperLink never registered
    other = init_consortium(out / "other", "other", ["127.0.0.1"], port)
    add_site(other, "alien")
    attempts = {
        "unregistered": (proc.supernode_command(
            superlink=address, ca_cert=consortium.tls.ca_cert,
            auth_key=consortium.site_keys("intruder").private_key, port=proc.free_port(),
            node_config={}, max_retries=1), "Failed to activate SuperNode"),
        "plaintext": ([str(proc.BIN / "flower-supernode"), "--insecure", "--superlink", address,
                       "--port", str(proc.free_port()), "--max-retries", "1",
                       "--max-wait-time", "10"], "could not establish a connection"),
        "foreign-ca": (proc.supernode_command(
            superlink=address, ca_cert=other.tls.ca_cert,
            auth_key=other.site_keys("alien").private_key, port=proc.free_port(),
            node_config={}, max_retries=1), "CERTIFICATE_VERIFY_FAILED"),
    }
    before = _nodes(home)
    for name, (command, reason) in attempts.items():
        log = out / f"{name}.log"
        attempt = group.start(name, command, log=log, cwd=out,
                              env={"FLWR_HOME": str(out / name)})
        try:
            code = attempt.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: the SuperNode kept running; it should have been refused")
        assert code != 0, name
        assert reason in log.read_text(), f"{name}: {log.read_text()[-1500:]}"
    after = _nodes(home)
    assert after == before  # nobody new, and hospital-a is still the only one online
    assert list(after.values()).count("online") == 1
    assert after[federation["node_id"]] == "online"


def _stop(home: ServerHome, run_id: str) -> None:
    """Stop a run unless the ServerApp already ended it (all its sites refused)."""
    try:
        proc.flwr_cli(home.cli_home, "stop", run_id)
    except proc.DeploymentError as exc:
        assert "already finished" in str(exc), exc


def _submit(home: ServerHome, app: str, config: Path) -> str:
    return str(proc.flwr_json(home.cli_home, "run", app, "--run-config", str(config))["run-id"])


@pytest.mark.deployment
def test_the_site_runs_only_code_the_consortium_signed(federation, tmp_path) -> None:
    home, work, consortium = federation["home"], federation["work"], federation["consortium"]
    values = load_run_config(CONFIGS / "demo.toml", {
        "num-rounds": 1, "min-sites": 1, "min-train-sites": 1, "secagg-enabled": False,
        "image-size": 32,
        "local-epochs": 1, "round-timeout": 120.0})
    config = tmp_path / "run.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    server_launcher = home.root / "launcher.log"

    def server_refusals() -> int:
        """ServerApps the server host's launcher refused to install (not signed by the
        coordinator's code-signing key): they never reach a site."""
        return server_launcher.read_text().count("is not a pinned build; refused")

    def sent() -> int:
        audit = work / "audit.jsonl"
        return audit.read_text().count('"update-sent"') if audit.exists() else 0

    def refused_at_the_server(run_id: str, count: int, what: str) -> None:
        _wait(lambda: server_refusals() >= count, 120, f"the server to refuse {what}")
        assert server_refusals() == count  # once per run
        _wait(lambda: proc.run_status(home.cli_home, run_id).startswith("finished"), 120,
              f"the run of {what} to end")
        assert proc.run_status(home.cli_home, run_id) == "finished:failed"

    supernode_log = work / "logs" / "supernode.log"

    # 1a. `flwr run <folder>` of the signed code pushes its FAB without the signature: the
    #     server host runs it (the same build the code key signed), the site refuses it
    #     (Flower's --trusted-entities check finds no signature).
    unattested = _submit(home, str(APP_DIR), config)
    _wait(lambda: "FAB could not be verified" in supernode_log.read_text()
          or "FAB verification failed" in supernode_log.read_text(), 120,
          "the site to refuse the app without its signature")
    _stop(home, unattested)
    # 1b. Unsigned code (other bytes) pushed the same way: its ServerApp would run on the
    #     server host beside the model-signing key; refused there.
    unsigned = _submit(home, str(_bumped_app(tmp_path / "unsigned", "0.1.0", "# edited\n")),
                       config)
    refused_at_the_server(unsigned, 1, "the unsigned app")

    # 2. Forged: the registry serves a signature of the same bytes by another key, under
    #    the consortium key's id.
    other = init_consortium(tmp_path / "other", "other", ["127.0.0.1"])
    forged = sign_app(other.folder, APP_DIR)
    index_path = consortium.folder / "apps" / "index.json"
    genuine = index_path.read_text()
    entries = json.loads(genuine)
    assert forged.sha256 == entries[0]["sha256"]  # same code, other signer
    entries[0]["signature"] = forged.signature
    entries[0]["signed_at"] = forged.signed_at
    index_path.write_text(json.dumps(entries))
    try:
        forged_run = _submit(home, federation["signed"].spec(), config)
        refused_at_the_server(forged_run, 2, "the foreign-signed app")
        # 2b. A compromised server: it holds the model-signing key and signs the code
        #     with it. Only the coordinator's offline code-signing key counts.
        entries[0]["signed_at"] = int(time.time())
        entries[0]["signature"] = _signature(consortium.folder / "signing.key",
                                             consortium.folder / "apps" /
                                             f"{entries[0]['sha256']}.fab",
                                             entries[0]["signed_at"])
        index_path.write_text(json.dumps(entries))
        server_signed = _submit(home, federation["signed"].spec(), config)
        refused_at_the_server(server_signed, 3, "code the server signed")
    finally:
        index_path.write_text(genuine)
    assert sent() == 0  # no refused app ever reached the training code

    # 2c. A build the coordinator signed after this site's kit was made (or an older
    #     one): the server runs it, but it is not pinned in the site's apps.json, so the
    #     site refuses it before it is installed.
    newer = _bumped_app(tmp_path / "newer", "0.1.1")
    unpinned = sign_app(consortium.folder, newer)
    launcher_log = work / "logs" / "launcher.log"
    unpinned_run = _submit(home, unpinned.spec(), config)
    _wait(lambda: "is not a pinned build" in launcher_log.read_text(), 120,
          "the site to refuse the unpinned build")
    _stop(home, unpinned_run)
    assert sent() == 0

    # 3. The consortium's own signature: the site trains and sends its update.
    refused_so_far = server_refusals()
    run_id = _submit(home, federation["signed"].spec(), config)
    _wait(lambda: sent() >= 1, 240, "the signed app to train at the site")
    assert server_refusals() == refused_so_far  # the server ran it
    _wait(lambda: proc.run_status(home.cli_home, run_id).startswith("finished"), 120,
          "the signed run to finish")
    assert proc.run_status(home.cli_home, run_id) == "finished:completed"


def _signature(key_path: Path, fab: Path, signed_at: int) -> str:
    """Flower's app signature (8-byte signed_at + SHA-256 of the FAB) by `key_path`."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    message = signed_at.to_bytes(8, "big") + hashlib.sha256(fab.read_bytes()).digest()
    return base64.urlsafe_b64encode(key.sign(message)).decode().rstrip("=")  # type: ignore


def _bumped_app(folder: Path, version: str, edit: str = "") -> Path:
    """A copy of the app's code under another version (what a later release is), with
    `edit` appended to server/app.py."""
    import re
    import shutil

    folder.mkdir(parents=True)
    for package in ("client", "common", "server"):
        shutil.copytree(APP_DIR / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    text = (APP_DIR / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(
        re.sub(r'^version = ".*"$', f'version = "{version}"', text, count=1, flags=re.M))
    (folder / "README.md").write_text((APP_DIR / "README.md").read_text())
    if edit:
        app = folder / "server" / "app.py"
        app.write_text(app.read_text() + edit)
    return folder


def _fedrad(*args: str) -> str:
    result = subprocess.run([*FEDRAD, *args], capture_output=True, text=True, timeout=180,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.deployment
def test_sites_are_revoked_on_the_running_server_and_state_survives_a_restart(
        federation) -> None:
    consortium, home, group = federation["consortium"], federation["home"], federation["group"]
    out, folder = federation["out"], str(federation["consortium"].folder)
    add_site(consortium, "hospital-r")
    kit = startup_kit(consortium, "hospital-r")
    assert "hospital-r: node" in _fedrad("server", "sync-sites", "--consortium", folder)
    node_r = json.loads(home.nodes.read_text())["hospital-r"]["node_id"]
    site_r = group.start("site-r", [*FEDRAD, "site", "start", "--kit", str(kit), "--data",
                                    str(federation["sites"]["hospital-b"]), "--work-dir",
                                    str(out / "site-r"), "--epsilon-budget", "5"],
                         log=out / "site-r.log", cwd=out, env={}, grace=30.0)
    _wait(lambda: _nodes(home).get(node_r) == "online", 90, "hospital-r online")

    _fedrad("consortium", "remove-site", "hospital-r", "--folder", folder)
    synced = _fedrad("server", "sync-sites", "--consortium", folder)
    assert f"hospital-r: node {node_r} unregistered" in synced
    assert _nodes(home)[node_r] == "unregistered"  # the SuperLink no longer accepts the key
    _wait(lambda: site_r.poll() is not None, 120, "the revoked SuperNode to be shut out")
    def audited(event: str) -> list[str]:
        return [e.get("site", "") for e in map(json.loads, (home.root / "audit.jsonl")
                                               .read_text().splitlines()) if e["event"] == event]

    assert audited("site-registered").count("hospital-r") == 1
    assert audited("site-unregistered") == ["hospital-r"]
    registrations = len(audited("site-registered"))

    # Restart the server: same state database, so hospital-a's node id stays valid and its
    # SuperNode (which retries) is back online without registering anything again.
    group.stop(federation["server"])
    assert not home.ready.exists()
    restarted = group.start("server-2", [*FEDRAD, "server", "start", "--consortium", folder,
                                         "--port", str(federation["port"])],
                            log=out / "server-2.log", cwd=out, env={}, grace=30.0)
    _wait(lambda: home.ready.exists() or restarted.poll() is not None, 90, "server restart")
    assert restarted.poll() is None, (out / "server-2.log").read_text()
    _wait(lambda: _nodes(home).get(federation["node_id"]) == "online", 120,
          "hospital-a back online after the restart")
    assert json.loads(home.nodes.read_text())["hospital-a"]["node_id"] == federation["node_id"]
    assert len(audited("server-started")) == 2
    assert len(audited("site-registered")) == registrations  # nothing registered again


@pytest.mark.deployment
def test_a_party_with_the_kits_ca_cannot_use_the_control_plane_on_the_public_port(
        federation) -> None:
    """Before the Fleet gateway, anyone holding the CA certificate every kit carries could
    `flwr ls` the runs, `flwr supernode register` a new "hospital" and start runs on the
    public port. Now only the Fleet routes pass there; the federation goes on."""
    import ssl
    import urllib.error
    import urllib.request

    consortium, home, port = federation["consortium"], federation["home"], federation["port"]
    outsider = federation["out"] / "outsider-cli"
    proc.write_cli_config(outsider, name="public", address=f"127.0.0.1:{port}",
                          ca_cert=consortium.tls.ca_cert)
    elsewhere = init_consortium(federation["out"] / "elsewhere", "x", ["127.0.0.1"], port)
    impostor = add_site(elsewhere, "impostor").public_key
    before = _nodes(home)
    config = federation["out"] / "outsider-run.toml"
    config.write_text('num-rounds = 1\n')
    for args in (("ls",), ("supernode", "register", str(impostor)),
                 ("run", federation["signed"].spec(), "--run-config", str(config)),
                 ("supernode", "ls")):
        with pytest.raises(proc.DeploymentError):
            proc.flwr_json(outsider, *args)
    context = ssl.create_default_context(cafile=str(consortium.tls.ca_cert))
    for path in ("/v1/control/list-runs", "/v1/control/register-node",
                 "/v1/runtime/get-nodes", "/v1/runtime/pull-task-input",
                 "/v1/fleet/register-node", "/docs", "/openapi.json", "/health"):
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=10)
        assert refused.value.code == 404, path
    after = _nodes(home)
    assert after == before  # no node was added; hospital-a is still online
    assert after[federation["node_id"]] == "online"
    # the coordinator's own CLI (on the server host, loopback Control API) still works
    assert "runs" in proc.flwr_json(home.cli_home, "ls")

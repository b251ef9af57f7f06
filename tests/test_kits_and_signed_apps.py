"""Startup kits (plain and sealed) and the consortium's signed-app registry."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import tarfile
import urllib.error
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from common.pki import ProvisioningError
from fedrad.app_registry import AppRegistry, key_id, sign_app
from fedrad.cli import app
from fedrad.consortium import add_site, export_server, init_consortium, startup_kit
from fedrad.demo import APP_DIR
from fedrad.kit import MEMBERS, KitError, open_kit

PASSPHRASE = "correct horse battery staple"


def _text(output: str) -> str:
    """A CLI's message without rich's box drawing and line wrapping."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


@pytest.fixture
def consortium(tmp_path):
    folder = init_consortium(tmp_path / "c", "lungs", ["fl.example.org", "10.0.0.5"], 9443)
    add_site(folder, "hospital-a")
    return folder


def test_a_kit_holds_what_a_site_needs_and_installs_private(consortium, tmp_path) -> None:
    kit_path = startup_kit(consortium, "hospital-a")
    kit = open_kit(kit_path, None)
    assert set(kit.files) == set(MEMBERS)
    assert kit.info == {"site": "hospital-a", "consortium": "lungs",
                        "superlink": "fl.example.org:9443"}
    assert kit.files["node.key"] == consortium.site_keys("hospital-a").private_key.read_bytes()
    code = (consortium.folder / "code-signing.pub").read_bytes().strip()
    assert kit.files["trusted-entities.yaml"].decode() == f'{key_id(code)}: "{code.decode()}"\n'
    model = (consortium.folder / "signing.pub").read_bytes()
    assert kit.files["signing.pub"] == model and model.strip() != code  # two keys
    assert json.loads(kit.files["apps.json"]) == {"apps": []}  # nothing signed yet
    installed = kit.install(tmp_path / "work" / "kit")
    assert stat.S_IMODE(installed.stat().st_mode) == 0o700
    assert stat.S_IMODE((installed / "node.key").stat().st_mode) == 0o600
    assert (installed / "ca.pem").read_bytes() == consortium.tls.ca_cert.read_bytes()


def test_a_compromised_server_holds_no_key_that_signs_code_for_the_sites(consortium,
                                                                          tmp_path) -> None:
    """The server bundle carries the model-signing key (it signs global models) and never
    the code-signing key that the sites' trusted entities name: a server cannot sign a
    ClientApp that runs at the hospitals. A kit made after an app was signed pins it."""
    bundle = tmp_path / "bundle"
    names = {p.name for p in export_server(consortium, bundle)}
    assert "signing.key" in names and "code-signing.key" not in names
    assert "code-signing.pub" in names  # the server's launcher verifies ServerApps by it
    assert not (bundle / "code-signing.key").exists()
    with pytest.raises(ProvisioningError, match="offline code-signing key"):
        sign_app(bundle, APP_DIR)
    signed = sign_app(consortium.folder, APP_DIR)
    add_site(consortium, "hospital-b")
    pins = json.loads(open_kit(startup_kit(consortium, "hospital-b"), None).files["apps.json"])
    assert pins == {"apps": [signed.sha256]}


def test_a_sealed_kit_needs_its_passphrase(consortium) -> None:
    sealed = startup_kit(consortium, "hospital-a", PASSPHRASE)
    assert sealed.name == "hospital-a.kit"
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    data = sealed.read_bytes()
    assert b"PRIVATE KEY" not in data and not tarfile.is_tarfile(sealed)
    assert open_kit(sealed, PASSPHRASE).files["node.key"] == \
        consortium.site_keys("hospital-a").private_key.read_bytes()
    with pytest.raises(KitError, match="sealed with a passphrase"):
        open_kit(sealed, None)
    with pytest.raises(KitError, match="wrong passphrase"):
        open_kit(sealed, PASSPHRASE + "!")
    altered = bytearray(data)
    altered[-5] ^= 0x01
    sealed.write_bytes(bytes(altered))
    with pytest.raises(KitError, match="wrong passphrase, or the kit was altered"):
        open_kit(sealed, PASSPHRASE)
    with pytest.raises(ProvisioningError, match="already exists"):
        startup_kit(consortium, "hospital-a")


def test_short_passphrases_and_non_kits_are_refused(consortium, tmp_path) -> None:
    with pytest.raises(KitError, match="at least 12"):
        startup_kit(consortium, "hospital-a", "short")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(KitError, match="not a fedrad startup kit"):
        open_kit(junk, None)
    with pytest.raises(KitError, match="cannot read"):
        open_kit(tmp_path / "missing.tar.gz", None)


def test_cli_seals_a_kit_and_site_start_checks_settings_before_starting(tmp_path) -> None:
    runner = CliRunner()
    folder = tmp_path / "c"
    assert runner.invoke(app, ["consortium", "init", "lungs", "--folder", str(folder),
                               "--port", "9443"]).exit_code == 0
    secret = tmp_path / "passphrase"
    secret.write_text("")
    empty = runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder", str(folder),
                                "--passphrase-file", str(secret)])
    assert empty.exit_code != 0 and "at least 12 characters" in _text(empty.output)
    assert not (folder / "sites" / "hospital-a.key").exists()  # no half-provisioned site
    secret.write_text(PASSPHRASE + "\n")
    made = runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder", str(folder),
                               "--passphrase-file", str(secret)])
    assert made.exit_code == 0, made.output
    kit = folder / "kits" / "hospital-a.kit"
    no_pass = runner.invoke(app, ["site", "start", "--kit", str(kit), "--data", str(tmp_path),
                                  "--work-dir", str(tmp_path / "w"), "--epsilon-budget", "5"],
                            env={"FEDRAD_KIT_PASSPHRASE": ""})
    assert no_pass.exit_code != 0 and "sealed with a passphrase" in _text(no_pass.output)
    no_budget = runner.invoke(app, ["site", "start", "--kit", str(kit), "--passphrase-file",
                                    str(secret), "--data", str(tmp_path),
                                    "--work-dir", str(tmp_path / "w")])
    assert no_budget.exit_code != 0 and "epsilon-budget" in _text(no_budget.output)
    bad_data = runner.invoke(app, ["site", "start", "--kit", str(kit), "--passphrase-file",
                                   str(secret), "--data", str(tmp_path / "nowhere"),
                                   "--work-dir", str(tmp_path / "w"), "--epsilon-budget", "5"])
    assert bad_data.exit_code != 0 and "is not a folder" in _text(bad_data.output)
    assert not (tmp_path / "w" / "logs").exists()  # nothing was started


def test_signed_apps_carry_flowers_signature_of_the_fab(consortium) -> None:
    signed = sign_app(consortium.folder, APP_DIR)
    fab = (consortium.folder / "apps" / f"{signed.sha256}.fab").read_bytes()
    assert hashlib.sha256(fab).hexdigest() == signed.sha256
    assert signed.app_id == "@fedrad/fedrad" and signed.spec().startswith("@fedrad/fedrad==")
    public = serialization.load_ssh_public_key(
        (consortium.folder / "code-signing.pub").read_bytes())
    message = signed.signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()
    padded = signed.signature + "=" * (-len(signed.signature) % 4)
    public.verify(base64.urlsafe_b64decode(padded), message)  # raises if it does not verify
    assert sign_app(consortium.folder, APP_DIR) == signed  # same bytes: nothing new


def test_a_version_names_one_code(consortium, tmp_path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text((APP_DIR / "pyproject.toml").read_text())
    for package in ("client", "common", "server"):
        (app_dir / package).mkdir()
        (app_dir / package / "__init__.py").write_text("")
    sign_app(consortium.folder, app_dir)
    (app_dir / "client" / "__init__.py").write_text("x = 1\n")
    with pytest.raises(ProvisioningError, match="bump version"):
        sign_app(consortium.folder, app_dir)


def test_the_registry_serves_signed_apps_only(consortium) -> None:
    signed = sign_app(consortium.folder, APP_DIR)

    def fetch(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{registry.api_url}/hub/fetch-fab",
                                         data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    with AppRegistry(consortium.folder) as registry:
        status, body = fetch({"app_id": signed.app_id, "app_version": signed.version})
        assert status == 200
        assert body["verifications"] == [{"public_key_id": signed.key_id,
                                          "signature": signed.signature,
                                          "signed_at": signed.signed_at}]
        with urllib.request.urlopen(body["fab_url"], timeout=10) as response:  # noqa: S310
            assert hashlib.sha256(response.read()).hexdigest() == signed.sha256
        assert fetch({"app_id": "@someone/else", "app_version": "1.0.0"})[0] == 404
        assert fetch({"app_id": signed.app_id, "app_version": "9.9.9"})[0] == 404
        assert fetch({"nothing": 1})[0] == 400
        for path in ("/v1/fab/../../signing.key", "/v1/fab/" + "0" * 64 + ".fab"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(registry.url + path, timeout=10)  # noqa: S310
            assert missing.value.code == 404


def test_the_server_copy_holds_no_private_key_but_its_own(consortium, tmp_path) -> None:
    signed = sign_app(consortium.folder, APP_DIR)
    copied = export_server(consortium, tmp_path / "bundle")
    names = {str(p.relative_to(tmp_path / "bundle")) for p in copied}
    assert {"ca.crt", "server.pem", "server.key", "signing.key", "signing.pub", "code-signing.pub",
            "consortium.json", "sites/hospital-a.pub", f"apps/{signed.sha256}.fab",
            "apps/index.json"} == names
    assert stat.S_IMODE((tmp_path / "bundle" / "server.key").stat().st_mode) == 0o600
    for path in copied:
        if path.name != "server.key" and path.name != "signing.key":
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    with pytest.raises(ProvisioningError, match="not empty"):
        export_server(consortium, tmp_path / "bundle")


def test_the_server_host_runs_only_serverapps_the_code_key_signed(consortium) -> None:
    """The server host's launcher pins what verifies with code-signing.pub: a signature by
    any other key (the server's own model-signing key included) pins nothing."""
    from fedrad.launcher import consortium_pins

    signed = sign_app(consortium.folder, APP_DIR)
    assert consortium_pins(consortium.folder) == {signed.sha256}
    index = consortium.folder / "apps" / "index.json"
    entries = json.loads(index.read_text())
    key = serialization.load_pem_private_key((consortium.folder / "signing.key").read_bytes(),
                                             password=None)
    message = entries[0]["signed_at"].to_bytes(8, "big") + bytes.fromhex(signed.sha256)
    entries[0]["signature"] = base64.urlsafe_b64encode(
        key.sign(message)).decode().rstrip("=")  # type: ignore[union-attr]
    index.write_text(json.dumps(entries))
    assert consortium_pins(consortium.folder) == frozenset()

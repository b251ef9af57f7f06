"""`fedrad consortium init / add-site / remove-site`: keys, kits, no silent overwrite."""

from __future__ import annotations

import stat
import tarfile

from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from common.pki import site_identity
from fedrad.cli import app


def test_provisioning_a_consortium_and_its_kits(tmp_path) -> None:
    runner = CliRunner()
    folder = tmp_path / "consortium"
    result = runner.invoke(app, ["consortium", "init", "lungs", "--folder", str(folder),
                                 "--host", "10.0.0.5"])
    assert result.exit_code == 0, result.output
    for name in ("ca.crt", "server.pem", "server.key", "signing.key", "signing.pub"):
        assert (folder / name).is_file()
    assert stat.S_IMODE((folder / "signing.key").stat().st_mode) == 0o600
    again = runner.invoke(app, ["consortium", "init", "lungs", "--folder", str(folder)])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output

    kit_result = runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder",
                                     str(folder)])
    assert kit_result.exit_code == 0, kit_result.output
    kit = folder / "kits" / "hospital-a.tar.gz"
    assert stat.S_IMODE(kit.stat().st_mode) == 0o600
    with tarfile.open(kit) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert set(members) == {"ca.pem", "node.key", "node.pub", "site.pem", "signing.pub",
                                "trusted-entities.yaml", "apps.json", "kit.json",
                                "node-config.toml", "README.txt"}
        assert members["node.key"].mode == 0o600
        site, key = site_identity(archive.extractfile("site.pem").read(),
                                  (folder / "ca.crt").read_bytes())
        assert site == "hospital-a" and key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ) == archive.extractfile("node.pub").read().split(b" fedrad-")[0]
        assert archive.extractfile("signing.pub").read() == (folder / "signing.pub").read_bytes()
        assert b"OPENSSH PRIVATE KEY" in archive.extractfile("node.key").read()
    dup = runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder", str(folder)])
    assert dup.exit_code != 0 and "refusing to overwrite" in dup.output
    bad = runner.invoke(app, ["consortium", "add-site", "Bad Name", "--folder", str(folder)])
    assert bad.exit_code != 0

    revoked = runner.invoke(app, ["consortium", "remove-site", "hospital-a", "--folder",
                                  str(folder)])
    assert revoked.exit_code == 0, revoked.output
    assert not (folder / "sites" / "hospital-a.key").exists()
    assert "hospital-a" in (folder / "revoked.json").read_text()
    reuse = runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder", str(folder)])
    assert reuse.exit_code != 0 and "was revoked" in reuse.output


def test_a_kit_from_before_site_certificates_is_reissued_with_the_same_node_key(
        tmp_path) -> None:
    """A kit without site.pem (made before secure aggregation bound keys to sites) does
    not open, and says how to get a new one; `reissue-kit` keeps the old kit aside and
    makes one with the same node key and a site certificate."""
    import io

    import pytest

    from fedrad.kit import KitError, open_kit

    runner = CliRunner()
    folder = tmp_path / "consortium"
    assert runner.invoke(app, ["consortium", "init", "lungs", "--folder", str(folder),
                               "--host", "10.0.0.5"]).exit_code == 0
    assert runner.invoke(app, ["consortium", "add-site", "hospital-a", "--folder",
                               str(folder)]).exit_code == 0
    kit = folder / "kits" / "hospital-a.tar.gz"
    old = tmp_path / "old.tar.gz"  # the same kit, as it was before site.pem existed
    with tarfile.open(kit) as source, tarfile.open(old, "w:gz") as target:
        for member in source.getmembers():
            if member.name != "site.pem":
                target.addfile(member, io.BytesIO(source.extractfile(member).read()))
    with pytest.raises(KitError, match="lacks site.pem; .*reissue-kit"):
        open_kit(old, None)
    node_key = open_kit(kit, None).files["node.key"]
    result = runner.invoke(app, ["consortium", "reissue-kit", "hospital-a", "--folder",
                                 str(folder)])
    assert result.exit_code == 0, result.output
    (kept,) = (folder / "kits").glob("hospital-a.*.old-kit")
    assert open_kit(kit, None).files["node.key"] == node_key
    assert "site.pem" in open_kit(kit, None).files and kept.stat().st_size > 0
    unknown = runner.invoke(app, ["consortium", "reissue-kit", "hospital-z", "--folder",
                                  str(folder)])
    assert unknown.exit_code != 0 and "no node key" in unknown.output

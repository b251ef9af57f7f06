"""A consortium folder: the CA, the SuperLink's TLS certificate, the model-signing key,
each site's node key, and the startup kit a hospital receives."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import pki
from fedrad import kit
from fedrad.app_registry import signed_hashes, trusted_entities

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Consortium:
    """Paths of a provisioned consortium."""

    folder: Path
    tls: pki.ServerTLS

    @property
    def info(self) -> dict[str, Any]:
        """consortium.json: name, hosts, and the SuperLink address sites connect to."""
        return dict(json.loads((self.folder / "consortium.json").read_text()))

    def site_keys(self, site: str) -> pki.NodeKeys:
        folder = self.folder / "sites"
        return pki.NodeKeys(private_key=folder / f"{site}.key", public_key=folder / f"{site}.pub")


def init_consortium(folder: Path, name: str, hosts: list[str], port: int = 9092
                    ) -> Consortium:
    """Create the CA, the SuperLink certificate (SANs = `hosts`) and the signing key in a
    new folder; the SuperLink's address for the kits is hosts[0]:port."""
    folder.mkdir(parents=True, exist_ok=True)
    pki.create_ca(folder, name)
    tls = pki.issue_server_cert(folder, hosts)
    pki.create_signing_key(folder, pki.MODEL_SIGNING)  # exported to the server
    pki.create_signing_key(folder, pki.CODE_SIGNING)  # stays here (offline)
    (folder / "consortium.json").write_text(json.dumps(
        {"name": name, "hosts": hosts, "superlink": f"{hosts[0]}:{port}"}, indent=1))
    return Consortium(folder=folder, tls=tls)


def add_site(consortium: Consortium, site: str) -> pki.NodeKeys:
    """Create the site's node-auth key pair (refuses to overwrite an existing one)."""
    if not SITE_NAME.match(site):
        raise pki.ProvisioningError(
            f"site name {site!r} must be 1-64 characters of a-z, 0-9, '-' or '_'"
        )
    listing = consortium.folder / "revoked.json"
    if listing.exists() and any(r["site"] == site for r in json.loads(listing.read_text())):
        raise pki.ProvisioningError(f"site {site!r} was revoked; provision it under a new name")
    return pki.create_node_keys(consortium.folder / "sites", site)


def load_consortium(folder: Path) -> Consortium:
    """An existing consortium folder (as `fedrad consortium init` wrote it)."""
    tls = pki.ServerTLS(ca_cert=folder / "ca.crt", server_cert=folder / "server.pem",
                        server_key=folder / "server.key")
    if not all(p.is_file() for p in (tls.ca_cert, folder / "signing.pub",
                                      folder / "consortium.json")):
        raise pki.ProvisioningError(f"{folder} is not a consortium folder (no ca.crt, "
                                    "signing.pub or consortium.json); run `fedrad consortium "
                                    "init` first")
    return Consortium(folder=folder, tls=tls)


def startup_kit(consortium: Consortium, site: str, passphrase: str | None = None, *,
                reissue: bool = False) -> Path:
    """The site's kit (kits/<site>.tar.gz, or <site>.kit sealed with `passphrase`), mode
    0600, never overwritten: with `reissue` (a new release's pins, a kit from before
    site certificates) an existing kit is kept as kits/<site>.<time>.old-kit and a new one
    made with the same node key."""
    keys = consortium.site_keys(site)
    if not keys.private_key.is_file():
        raise pki.ProvisioningError(f"site {site!r} has no node key; run add-site first")
    kits = consortium.folder / "kits"
    for existing in (kits / f"{site}.tar.gz", kits / f"{site}.kit"):
        if existing.exists() and reissue:
            existing.rename(kits / f"{site}.{time.strftime('%Y%m%dT%H%M%S')}.old-kit")
        elif existing.exists():
            raise pki.ProvisioningError(f"{existing} already exists; refusing to overwrite "
                                        "a kit (`fedrad consortium reissue-kit` keeps it "
                                        "aside and makes a new one)")
    info = consortium.info
    node_config = (f'site-id = "{site}"\ndata-dir = "/path/to/dicom-export"\n'
                   'work-dir = "/var/lib/fedrad"\nepsilon-budget = 10.0\n'
                   '# To pull the cohort from the PACS into data-dir before each start:\n'
                   '# dicomweb-url = "https://pacs.hospital/dicom-web"\n'
                   '# dicomweb-credentials = "/etc/fedrad/pacs.toml"  # mode 600\n'
                   '# dicomweb-ca-bundle = "/etc/fedrad/pacs-ca.pem"\n'
                   '# dicomweb-study-filter = { ModalitiesInStudy = "CR" }\n')
    code_pub = consortium.folder / f"{pki.CODE_SIGNING}.pub"
    if not code_pub.is_file():
        raise pki.ProvisioningError(
            f"{consortium.folder} has no {code_pub.name} (a consortium from before code and "
            "models were signed with separate keys); run `fedrad consortium init` anew")
    data = kit.build({
        "ca.pem": consortium.tls.ca_cert.read_bytes(),
        "node.key": keys.private_key.read_bytes(),
        "node.pub": keys.public_key.read_bytes(),
        "site.pem": pki.issue_site_cert(consortium.folder, site, keys.public_key.read_bytes()),
        "signing.pub": (consortium.folder / f"{pki.MODEL_SIGNING}.pub").read_bytes(),
        "trusted-entities.yaml": trusted_entities(code_pub).encode(),
        "apps.json": json.dumps({"apps": signed_hashes(consortium.folder)}).encode(),
        "kit.json": json.dumps({"site": site, "consortium": info["name"],
                                "superlink": info["superlink"]}).encode(),
        "node-config.toml": node_config.encode(),
        "README.txt": kit.README.format(site=site, name=info["name"]).encode(),
    })
    path = kits / f"{site}.kit" if passphrase else kits / f"{site}.tar.gz"
    if passphrase:
        data = kit.seal(data, passphrase)
    kits.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def export_server(consortium: Consortium, out: Path) -> list[Path]:
    """Copy what `fedrad server start` reads into a new folder (mode 0700): never the
    CA's private key or a site's private key."""
    if out.exists() and any(out.iterdir()):
        raise pki.ProvisioningError(f"{out} is not empty; choose a new folder")
    folder = consortium.folder
    # The model-signing key goes to the server; the code-signing key never does (a
    # compromised server must not be able to sign code that runs at every hospital).
    wanted = [folder / n for n in ("ca.crt", "server.pem", "server.key", "signing.key",
                                   "signing.pub", "code-signing.pub", "consortium.json",
                                   "revoked.json")]
    wanted += sorted((folder / "sites").glob("*.pub")) + sorted((folder / "apps").glob("*"))
    copied = []
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    for path in wanted:
        if not path.is_file():
            continue
        target = out / path.relative_to(folder)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
        target.chmod(path.stat().st_mode & 0o777)
        copied.append(target)
    return copied


def remove_site(consortium: Consortium, site: str) -> Path:
    """Revoke a site: its key moves to revoked/ and is listed in revoked.json.

    The coordinator then unregisters it from a running SuperLink
    (`flwr supernode unregister`); a revoked key is never re-issued under that name.
    """
    keys = consortium.site_keys(site)
    if not keys.public_key.is_file():
        raise pki.ProvisioningError(f"no site {site!r} in {consortium.folder}")
    revoked_dir = consortium.folder / "revoked"
    revoked_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (keys.private_key, keys.public_key):
        path.rename(revoked_dir / f"{stamp}-{path.name}")
    listing = consortium.folder / "revoked.json"
    revoked = json.loads(listing.read_text()) if listing.exists() else []
    revoked.append({"site": site, "revoked": stamp,
                    "public_key": (revoked_dir / f"{stamp}-{site}.pub").read_text().strip()})
    listing.write_text(json.dumps(revoked, indent=1))
    return listing

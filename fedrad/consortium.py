"""A consortium folder: the CA, the SuperLink's TLS certificate, the model-signing key,
each site's node key, and the startup kit a hospital receives."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import pki

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Consortium:
    """Paths of a provisioned consortium."""

    folder: Path
    tls: pki.ServerTLS

    def site_keys(self, site: str) -> pki.NodeKeys:
        folder = self.folder / "sites"
        return pki.NodeKeys(private_key=folder / f"{site}.key", public_key=folder / f"{site}.pub")


def init_consortium(folder: Path, name: str, hosts: list[str]) -> Consortium:
    """Create the CA and the SuperLink certificate (SANs = `hosts`) in a new folder."""
    folder.mkdir(parents=True, exist_ok=True)
    pki.create_ca(folder, name)
    tls = pki.issue_server_cert(folder, hosts)
    pki.create_signing_key(folder)
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


KIT_README = """fedrad startup kit for site {site} of consortium {name}

ca.pem          the consortium CA: the SuperNode trusts the SuperLink's TLS certificate by it
node.key        this site's node-authentication private key (keep it secret, mode 0600)
node.pub        its public key (registered with the SuperLink by the coordinator)
signing.pub     the consortium's model-verification key (node config model-verify-key)
node-config.toml  a template of the site's node config: fill in data-dir, work-dir and
                the site's own privacy budget; nothing from the server can change them
"""


def load_consortium(folder: Path) -> Consortium:
    """An existing consortium folder (as `fedrad consortium init` wrote it)."""
    tls = pki.ServerTLS(ca_cert=folder / "ca.crt", server_cert=folder / "server.pem",
                        server_key=folder / "server.key")
    if not tls.ca_cert.is_file() or not (folder / "signing.pub").is_file():
        raise pki.ProvisioningError(f"{folder} is not a consortium folder (no ca.crt or "
                                    "signing.pub); run `fedrad consortium init` first")
    return Consortium(folder=folder, tls=tls)


def _add_file(archive: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    archive.addfile(info, io.BytesIO(data))


def startup_kit(consortium: Consortium, site: str, name: str) -> Path:
    """The site's kit as one archive (kits/<site>.tar.gz, mode 0600): never overwritten."""
    keys = consortium.site_keys(site)
    if not keys.private_key.is_file():
        raise pki.ProvisioningError(f"site {site!r} has no node key; run add-site first")
    kit = consortium.folder / "kits" / f"{site}.tar.gz"
    if kit.exists():
        raise pki.ProvisioningError(f"{kit} already exists; refusing to overwrite a kit")
    kit.parent.mkdir(parents=True, exist_ok=True)
    node_config = (f'site-id = "{site}"\ndata-dir = "/path/to/dicom-export"\n'
                   'work-dir = "/var/lib/fedrad"\nepsilon-budget = 10.0\n'
                   'model-verify-key = "/etc/fedrad/kit/signing.pub"\n')
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        _add_file(archive, "ca.pem", consortium.tls.ca_cert.read_bytes(), 0o644)
        _add_file(archive, "node.key", keys.private_key.read_bytes(), 0o600)
        _add_file(archive, "node.pub", keys.public_key.read_bytes(), 0o644)
        _add_file(archive, "signing.pub", (consortium.folder / "signing.pub").read_bytes(),
                  0o644)
        _add_file(archive, "node-config.toml", node_config.encode(), 0o644)
        _add_file(archive, "README.txt", KIT_README.format(site=site, name=name).encode(),
                  0o644)
    fd = os.open(kit, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(buffer.getvalue())
    return kit


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

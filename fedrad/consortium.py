"""A consortium folder: the CA, the SuperLink's TLS certificate and each site's node key."""

from __future__ import annotations

import re
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
    return pki.create_node_keys(consortium.folder / "sites", site)

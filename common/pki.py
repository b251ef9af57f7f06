"""Consortium key material: CA, SuperLink TLS certificate, SuperNode auth keys.

Everything is made with `cryptography` primitives. Private keys are written with
mode 0600 and never overwritten: provisioning twice is an error, not a silent
re-key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_DAYS = 825


class ProvisioningError(RuntimeError):
    """A consortium folder is missing something or would be overwritten."""


@dataclass(frozen=True)
class ServerTLS:
    """Paths of the SuperLink's TLS material."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one SuperNode's authentication key pair (OpenSSH public key)."""

    private_key: Path
    public_key: Path


def _write_new(path: Path, data: bytes, *, private: bool) -> None:
    """Write a file that must not exist yet; private files get mode 0600."""
    if path.exists():
        raise ProvisioningError(
            f"{path} already exists; refusing to overwrite key material. "
            "Remove it deliberately (or use a new folder) to re-provision."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(folder: Path, consortium: str) -> tuple[Path, Path]:
    """Create the consortium CA (EC P-384) in `folder`; return (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"{consortium} consortium CA", consortium)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    _write_new(key_path, _pem_private(key), private=True)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if not cert_path.is_file() or not key_path.is_file():
        raise ProvisioningError(
            f"No consortium CA in {folder}: expected ca.crt and ca.key. "
            "Run `fedrad consortium init` first."
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"{key_path} is not an EC private key")
    return cert, key


LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def issue_server_cert(folder: Path, hosts: list[str]) -> ServerTLS:
    """Issue the SuperLink's TLS certificate, signed by the CA in `folder`.

    `hosts` become subject alternative names (IP addresses or DNS names).
    """
    if not hosts:
        raise ProvisioningError("server certificate needs at least one host name or IP")
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    # The SuperLink itself listens on loopback (its Control API must not be public) and
    # the Fleet gateway, the coordinator's CLI and the ServerApp reach it there.
    for host in [*hosts, *(h for h in LOOPBACK_NAMES if h not in hosts)]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], str(org)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    tls = ServerTLS(
        ca_cert=folder / "ca.crt",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
    )
    _write_new(tls.server_key, _pem_private(key), private=True)
    _write_new(tls.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return tls


def create_node_keys(folder: Path, site: str) -> NodeKeys:
    """Create a SuperNode auth key pair (EC P-384; public key in OpenSSH format)."""
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(private_key=folder / f"{site}.key", public_key=folder / f"{site}.pub")
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_new(keys.private_key, private, private=True)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_new(keys.public_key, public + f" fedrad-{site}\n".encode(), private=False)
    return keys


MODEL_SIGNING = "signing"  # the server's key: global models (signing.key / signing.pub)
CODE_SIGNING = "code-signing"  # the coordinator's offline key: ClientApp code


def create_signing_key(folder: Path, name: str = MODEL_SIGNING) -> tuple[Path, Path]:
    """Create an Ed25519 signing key pair `<name>.key` / `<name>.pub` in `folder`: the
    server's model-signing key (MODEL_SIGNING) or the coordinator's code-signing key
    (CODE_SIGNING), which never leaves the coordinator's machine."""
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    priv_path, pub_path = folder / f"{name}.key", folder / f"{name}.pub"
    _write_new(priv_path, priv, private=True)
    _write_new(pub_path, pub + b"\n", private=False)
    return priv_path, pub_path


def serves_loopback(cert_path: Path) -> bool:
    """Whether a server certificate names 127.0.0.1 (the SuperLink's own listener)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


SITE_CERT = "site.pem"  # a kit's site identity certificate (its node key, signed by the CA)


class IdentityError(ValueError):
    """A site identity certificate that the consortium CA did not issue to a site."""


def issue_site_cert(folder: Path, site: str, node_public_key: bytes) -> bytes:
    """The site's identity certificate (PEM): its node-authentication public key (OpenSSH
    form, as `create_node_keys` wrote it) under CN=`site`, signed by the consortium CA,
    extended key usage client-auth only (a server certificate never passes as a site's).
    Peers check it before they derive masks with the site (common.masking)."""
    ca_cert, ca_key = _load_ca(folder)
    public = serialization.load_ssh_public_key(node_public_key)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ProvisioningError(f"site {site!r}: the node key is not an EC key")
    now = dt.datetime.now(dt.UTC)
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(site, str(org)))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def site_identity(cert_pem: bytes, ca_pem: bytes) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The site name and public key a site identity certificate vouches for, once it is
    shown to be issued by the consortium CA to a site (valid now, not a CA, client-auth
    only); IdentityError otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not issued by the consortium CA ({exc})") from exc
    except Exception as exc:  # InvalidSignature: the CA did not sign it
        raise IdentityError("its signature does not verify with the consortium CA") from exc
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError("it is not valid now")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("it is not a site certificate (no key usage)") from exc
    if basic.ca or list(usage) != [ExtendedKeyUsageOID.CLIENT_AUTH]:
        raise IdentityError("it is not a site certificate (a CA or server certificate)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    public = cert.public_key()
    if len(names) != 1 or not isinstance(public, ec.EllipticCurvePublicKey):
        raise IdentityError("it names no single site or holds no EC key")
    return str(names[0].value), public

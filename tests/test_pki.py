from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.pki import ProvisioningError
from fedrad.consortium import add_site, init_consortium


def test_consortium_material(tmp_path) -> None:
    consortium = init_consortium(tmp_path / "c", "test", ["127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate(consortium.tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(consortium.tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    keys = add_site(consortium, "hospital-a")
    private = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    for path in (keys.private_key, consortium.tls.server_key, consortium.folder / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_never_overwrites_keys(tmp_path) -> None:
    consortium = init_consortium(tmp_path / "c", "test", ["127.0.0.1"])
    first = add_site(consortium, "site-1").private_key.read_bytes()
    with pytest.raises(ProvisioningError, match="refusing to overwrite"):
        add_site(consortium, "site-1")
    assert consortium.site_keys("site-1").private_key.read_bytes() == first
    with pytest.raises(ProvisioningError, match="refusing to overwrite"):
        init_consortium(tmp_path / "c", "test", ["127.0.0.1"])
    with pytest.raises(ProvisioningError, match="site name"):
        add_site(consortium, "../evil")

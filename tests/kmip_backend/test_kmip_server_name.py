"""The KMIP server's certificate must name the configured server: PyKMIP checks only the
chain, the gateway checks the name (RFC 6125) on every connection."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.adversarial.hostile import rv, s, u
from tests.gateway_proc import Gateway
from tests.kmip_backend.conftest import kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.kmip_backend.test_kmip_raw import rsa_pair, session

from p11gate.backends.kmip.server_name import certificate_names
from p11gate.codec import Mechanism, ckr

CKM_RSA_KEYGEN, CKA_LABEL, CKA_MODULUS_BITS = 0x0, 0x3, 0x121


def _cert(*names: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmip.example")]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_names_are_matched_as_rfc_6125_says() -> None:
    der = _cert(x509.DNSName("kmip.example"), x509.DNSName("*.hsm.example"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.7")))
    assert certificate_names("kmip.example", der)
    assert certificate_names("KMIP.example.", der)
    assert certificate_names("a.hsm.example", der)
    assert not certificate_names("a.b.hsm.example", der)  # one label only
    assert not certificate_names("hsm.example", der)
    assert certificate_names("10.0.0.7", der)
    assert not certificate_names("10.0.0.8", der)
    assert not certificate_names("other.example", der)
    # the subject CN alone never counts
    assert not certificate_names("kmip.example", _cert())
    # an IP address is not matched against DNS names spelling it
    assert not certificate_names("10.0.0.7", _cert(x509.DNSName("10.0.0.7")))


def test_a_server_whose_certificate_names_another_host_is_not_used(
        kmip_server: KmipServerProc, tmp_path: Path) -> None:
    """The test server's certificate names localhost and 127.0.0.1: expecting another
    name, every call that needs the server fails with CKR_DEVICE_ERROR and no request
    reaches it; with the right name it works."""
    cfg = kmip_gateway_config(tmp_path, kmip_server, server_name="kmip.example")
    before = kmip_server.operations("CreateKeyPair")
    g = Gateway(cfg)
    try:
        c, sess = session(g)
        code = rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                  [u(CKA_MODULUS_BITS, 2048), s(CKA_LABEL, "never-made")],
                  [s(CKA_LABEL, "never-made")])
        assert code == ckr.DEVICE_ERROR
        assert kmip_server.operations("CreateKeyPair") == before
        assert "ServerNameMismatch" in g.log()
        c.close()
    finally:
        g.stop()
    (tmp_path / "ok").mkdir()
    cfg = kmip_gateway_config(tmp_path / "ok", kmip_server, server_name="localhost")
    g = Gateway(cfg)
    try:
        c, sess = session(g)
        pub, priv = rsa_pair(c, sess, "named")
        assert pub and priv
        c.close()
    finally:
        g.stop()

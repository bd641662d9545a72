"""The [tls] section and the client side's files: every bad file is reported when the
configuration is read (file, key, fix), never as a passphrase prompt or a traceback;
identities from certificates carry the subject and every SAN type."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from tests.remote.pki import CA, make_pki
from tests.softhsm import MODULE

from p11gate.config import ConfigError, parse_config
from p11gate.remote.client_cas import ClientCAs
from p11gate.remote.tls import client_context, parse_tls_address, peer_address, peer_identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def raw(pki: dict[str, Path], listen: list[str] | None = None,
        **tls: object) -> dict[str, Any]:
    section: dict[str, object] = {"cert": str(pki["server.pem"]), "key": str(pki["server.key"]),
                                  "client_ca": str(pki["ca"]), **tls}
    out: dict[str, Any] = {
        "server": {"listen": listen or ["tls:127.0.0.1:8443"]},
        "backend": [{"name": "softhsm", "module": MODULE}],
        "token": [{"name": "signing", "backend": "softhsm"}],
        "tls": section,
    }
    return out


def error(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "gw.toml")
    return str(e.value)


def test_a_good_tls_section_and_listener_addresses(pki: dict[str, Path]) -> None:
    cfg = parse_config(raw(pki, ["unix:path=/run/x.sock", "tls:127.0.0.1:8443",
                                 "tls:[::1]:9443"], crl=str(pki["crl"])), "gw.toml")
    assert cfg.tls is not None and cfg.tls.crl == str(pki["crl"])
    assert parse_tls_address("tls:[::1]:9443") == ("::1", 9443)
    assert parse_tls_address("tls:gw1.example:8443") == ("gw1.example", 8443)


def test_listener_and_section_errors_name_file_key_and_fix(pki: dict[str, Path],
                                                           tmp_path: Path) -> None:
    no_section = raw(pki)
    del no_section["tls"]
    assert "there is no [tls] section" in error(no_section)
    for bad in ("tls:127.0.0.1", "tls:host:0", "tls::8443", "tcp:127.0.0.1:8443"):
        msg = error(raw(pki, [bad]))
        assert msg.startswith("gw.toml: server.listen: ") and bad in msg, msg
    assert "gw.toml: tls.require_client_cert: unknown key" in error(
        raw(pki, require_client_cert=False))
    missing = str(tmp_path / "nope.pem")
    assert f"gw.toml: tls.cert: {missing!r} does not exist" in error(raw(pki, cert=missing))
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    assert "gw.toml: tls.cert: " in error(raw(pki, cert=str(junk)))
    assert "holds no PEM certificate" in error(raw(pki, client_ca=str(junk)))
    assert "tls.key: " in error(raw(pki, key=str(junk))) and "no PEM private key" in error(
        raw(pki, key=str(junk)))
    assert "tls.crl: " in error(raw(pki, crl=str(junk)))
    # the key of another certificate
    msg = error(raw(pki, key=str(pki["tenant-a.key"])))
    assert f"tls.key: {str(pki['tenant-a.key'])!r} is not the key of the certificate" in msg


def test_an_encrypted_key_is_an_error_not_a_prompt(pki: dict[str, Path], tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki["server.key"].read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    assert "tls.key: " in error(raw(pki, key=str(enc)))
    assert "is encrypted: give an unencrypted key" in error(raw(pki, key=str(enc)))
    with pytest.raises(ValueError, match=r"--key: .* is encrypted"):
        client_context(str(pki["server.pem"]), str(enc), str(pki["ca"]))
    # the tunnel says so on stderr and exits, with a terminal or without
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "tunnel", "--cert", str(pki["server.pem"]),
         "--key", str(enc), "--ca", str(pki["ca"]), "tls:127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "is encrypted" in r.stderr, r.stderr
    assert "secret" not in r.stderr


def test_crls_that_would_refuse_everyone_are_errors(tmp_path: Path) -> None:
    ca, other = CA("test CA"), CA("other CA")
    files = {"ca": tmp_path / "ca.pem"}
    files["ca"].write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    cert, key = ca.issue("gateway", server=True,
                         sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    files["server.pem"] = tmp_path / "server.pem"
    files["server.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["server.key"] = tmp_path / "server.key"
    files["server.key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    now = dt.datetime.now(dt.UTC)
    expired = (x509.CertificateRevocationListBuilder().issuer_name(ca.name)
               .last_update(now - dt.timedelta(days=10))
               .next_update(now - dt.timedelta(days=1)).sign(ca.key, hashes.SHA256()))
    (tmp_path / "expired.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    msg = error(raw(files, crl=str(tmp_path / "expired.pem")))
    assert "tls.crl: " in msg and "expired on" in msg and "publish a fresh CRL" in msg
    (tmp_path / "foreign.pem").write_bytes(other.crl([]).public_bytes(serialization.Encoding.PEM))
    msg = error(raw(files, crl=str(tmp_path / "foreign.pem")))
    assert "tls.crl: " in msg and "is not from a CA in client_ca" in msg


class _FakeSSL:
    def __init__(self, der: bytes | None, chain: list[bytes] | None = None) -> None:
        self.der = der
        self.chain = chain

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der

    def get_verified_chain(self) -> list[bytes] | None:
        return self.chain


def test_identity_from_a_certificate_has_subject_and_every_san_type() -> None:
    ca = CA("test CA")
    cert, _ = ca.issue("app1", sans=[
        x509.DNSName("app1.example"),
        x509.UniformResourceIdentifier("spiffe://example/app1"),
        x509.RFC822Name("app1@example.org"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ])
    der = cert.public_bytes(serialization.Encoding.DER)
    chain = [der, ca.cert.public_bytes(serialization.Encoding.DER)]
    ident = peer_identity(_FakeSSL(der, chain), "192.0.2.7:51000",  # type: ignore[arg-type]
                          ClientCAs([ca.cert]))
    assert ident is not None and ident.kind == "tls"
    assert ident.subject == "CN=app1,O=p11gate tests"
    assert ident.sans == ("DNS:app1.example", "URI:spiffe://example/app1",
                          "EMAIL:app1@example.org", "IP:10.1.2.3")
    assert ident.address == "192.0.2.7:51000"
    assert ident.key == "cert:CN=app1,O=p11gate tests"
    assert ident.issuer == "CN=test CA,O=p11gate tests" and ident.ca_index == 0
    assert ident.describe() == ("ca=CN=test CA,O=p11gate tests cert=CN=app1,O=p11gate tests "
                                "from 192.0.2.7:51000")
    # no certificate, no identity (the connection is closed before any call)
    assert peer_identity(_FakeSSL(None), "192.0.2.7:51000") is None  # type: ignore[arg-type]
    assert peer_identity(None, None) is None


def test_peer_addresses_are_unambiguous() -> None:
    assert peer_address(("192.0.2.7", 51000)) == "192.0.2.7:51000"
    assert peer_address(("::1", 51000, 0, 0)) == "[::1]:51000"
    assert peer_address("/run/p11gate.sock") is None and peer_address(None) is None

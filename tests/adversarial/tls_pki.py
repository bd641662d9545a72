"""Two client CAs for the TLS identity tests, made with `cryptography`: "Clients CA A"
(also the gateway's CA) and "Clients CA B" with an intermediate "Clients CA B sub";
client certificates of each, among them one of CA B (and one of its intermediate)
that carry tenant A's subject, and one of CA A whose CN holds a newline."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)
ORG = "p11gate tests"
#: a CN that would start a forged record in a line-oriented log
EVIL_CN = "evil\ninfo    p11gate.server: client connected peer=forged-record"


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def key_id(cert: x509.Certificate) -> str:
    """The CA id the gateway documents: sha256 of the public key, 32 hex digits."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()[:32]


class Authority:
    def __init__(self, cn: str, parent: Authority | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = name(cn)
        signer = parent or self
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name)
            .issuer_name(signer.name if parent else self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(signer.key, hashes.SHA256())
        )

    def issue(self, cn: str, server: bool = False) -> tuple[x509.Certificate,
                                                             ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(self.key, hashes.SHA256()), key


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


#: client name → (issuing authority, CN)
CLIENTS = {
    "tenant-a": ("A", "tenant-a"),          # tenant A, from its own CA
    "forged-a": ("B", "tenant-a"),          # tenant A's subject, from CA B
    "forged-a-sub": ("Bsub", "tenant-a"),   # the same, through CA B's intermediate
    "b-app": ("B", "b-app"),                # CA B's own client
    "evil": ("A", EVIL_CN),                 # a CN with a newline
}


def make_two_ca_pki(d: Path) -> dict[str, object]:
    """Files: client_ca.pem (CA A, then CA B's root), server.{pem,key}, and
    <client>.{pem,key} for each of CLIENTS (a client of the intermediate sends it in
    its chain). Also the CAs' subjects and ids."""
    d.mkdir(parents=True, exist_ok=True)
    a, b = Authority("Clients CA A"), Authority("Clients CA B")
    bsub = Authority("Clients CA B sub", parent=b)
    cas = {"A": a, "B": b, "Bsub": bsub}
    out: dict[str, object] = {"client_ca": d / "client_ca.pem", "ca_a": d / "ca_a.pem"}
    (d / "client_ca.pem").write_bytes(_pem(a.cert, b.cert))
    (d / "ca_a.pem").write_bytes(_pem(a.cert))
    server, skey = a.issue("gateway", server=True)
    (d / "server.pem").write_bytes(_pem(server))
    _write_key(skey, d / "server.key")
    out["server.pem"], out["server.key"] = d / "server.pem", d / "server.key"
    for client, (ca, cn) in CLIENTS.items():
        cert, key = cas[ca].issue(cn)
        chain = (cert, bsub.cert) if ca == "Bsub" else (cert,)
        (d / f"{client}.pem").write_bytes(_pem(*chain))
        _write_key(key, d / f"{client}.key")
        out[f"{client}.pem"], out[f"{client}.key"] = d / f"{client}.pem", d / f"{client}.key"
    out["issuer_a"] = a.cert.subject.rfc4514_string()
    out["issuer_b"] = b.cert.subject.rfc4514_string()
    out["id_b"] = key_id(b.cert)
    return out


def issue_named(ca: Authority, subject: x509.Name, sans: list[x509.GeneralName],
                d: Path, client: str) -> dict[str, Path]:
    """A client certificate of ``ca`` with any subject (empty too: its SANs are then
    critical, as RFC 5280 wants) and SANs, written as ``d/<client>.{pem,key}``."""
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=not len(subject))
    (d / f"{client}.pem").write_bytes(_pem(b.sign(ca.key, hashes.SHA256())))
    _write_key(key, d / f"{client}.key")
    return {"cert": d / f"{client}.pem", "key": d / f"{client}.key"}


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = bytes([n]) if n < 128 else (
        bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big"))
    return bytes([tag]) + size + body


def patched(ca: Authority, cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
    """``cert`` (PEM) with ``old`` replaced by ``new`` (same length) in its TBS part and
    signed again by ``ca``: encodings OpenSSL verifies that a strict DER parser may not."""
    tbs = cert.tbs_certificate_bytes
    assert old in tbs and len(old) == len(new)
    tbs = tbs.replace(old, new, 1)
    sig = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
    der = _der(0x30, tbs + ecdsa_sha256 + _der(0x03, b"\0" + sig))
    b64 = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + b64 + b"-----END CERTIFICATE-----\n"

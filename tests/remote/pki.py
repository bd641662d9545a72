"""A throw-away PKI for TLS tests, made with `cryptography`: a CA, the gateway's
certificate (127.0.0.1/localhost), client certificates (one revoked in a CRL), and a
client certificate from a CA the gateway does not trust."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p11gate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class CA:
    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(cn)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn: str, *, server: bool = False,
              sans: list[x509.GeneralName] | None = None) -> tuple[x509.Certificate,
                                                                    ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(self.key, hashes.SHA256()), key

    def crl(self, revoked: list[x509.Certificate]) -> x509.CertificateRevocationList:
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
             .last_update(NOW - dt.timedelta(hours=1)).next_update(NOW + dt.timedelta(days=7)))
        for c in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(c.serial_number)
                .revocation_date(NOW - dt.timedelta(minutes=5)).build())
        return b.sign(self.key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    """Files: ca, server.{pem,key}, crl, and for each client name <name>.{pem,key}:
    tenant-a, tenant-b, revoked (in the CRL), untrusted (another CA)."""
    d.mkdir(parents=True, exist_ok=True)
    ca, rogue = CA("p11gate test CA"), CA("rogue CA")
    out: dict[str, Path] = {"ca": d / "ca.pem", "crl": d / "crl.pem"}
    out["ca"].write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    server, skey = ca.issue("gateway", server=True, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    out["server.pem"], out["server.key"] = d / "server.pem", d / "server.key"
    out["server.pem"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(skey, out["server.key"])
    issued = {}
    for name, issuer in (("tenant-a", ca), ("tenant-b", ca), ("revoked", ca),
                         ("untrusted", rogue)):
        cert, key = issuer.issue(name, sans=[x509.DNSName(f"{name}.clients.example")])
        issued[name] = cert
        out[f"{name}.pem"], out[f"{name}.key"] = d / f"{name}.pem", d / f"{name}.key"
        out[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[f"{name}.key"])
    out["crl"].write_bytes(ca.crl([issued["revoked"]]).public_bytes(serialization.Encoding.PEM))
    return out

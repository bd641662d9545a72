"""Fifth review (what nodes write to the shared store): an identity string is the
client's certificate's text, and a SAN-only certificate's identity is its SANs
verbatim: a URI SAN may hold a NUL, which PostgreSQL text cannot. The per-identity
quota's lock name carried the identity raw: each handshake of such a certificate made
the store's statement fail, and a failure turns the shared quota counting off for every
identity on that node for 5 s (`frontend/shared_usage.py`, RETRY). One client
reconnecting every few seconds gave every tenant its connection quota once per node.

Two real gateway nodes on a throw-away PostgreSQL store, raw TLS clients.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.postgres import Postgres
from tests.remote.pki import CA, _write_key
from tests.remote.tls_setup import free_port, open_config, tls_socket
from tests.softhsm import make_token

MAX_CONNS = 2
NOW = dt.datetime.now(dt.UTC)


def pki_with_nul_san(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True)
    ca = CA("p11gate test CA")
    out = {"ca": d / "ca.pem", "crl": d / "crl.pem"}
    out["ca"].write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    out["crl"].write_bytes(ca.crl([]).public_bytes(serialization.Encoding.PEM))
    for name, (cert, key) in {
        "server": ca.issue("gateway", server=True, sans=[
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "tenant-b": ca.issue("tenant-b"),
    }.items():
        out[f"{name}.pem"], out[f"{name}.key"] = d / f"{name}.pem", d / f"{name}.key"
        out[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[f"{name}.key"])
    key = ec.generate_private_key(ec.SECP256R1())
    nul = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.name)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(NOW - dt.timedelta(days=1))
           .not_valid_after(NOW + dt.timedelta(days=30))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                          critical=False)
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier("spiffe://example/a\x00b")]), critical=True)
           .sign(ca.key, hashes.SHA256()))
    out["nul.pem"], out["nul.key"] = d / "nul.pem", d / "nul.key"
    out["nul.pem"].write_bytes(nul.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out["nul.key"])
    return out


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, Any]]:
    pki = pki_with_nul_san(tmp_path / "pki")
    token = make_token(tmp_path / "softhsm", keys=False)
    pg = Postgres().start()
    gws, ports = [], []
    try:
        for i in range(2):
            port = free_port()
            cfg = open_config(tmp_path / f"node{i}", token, pki, port)
            text = cfg.read_text().replace(
                "[server]\n", f"[server]\nmax_connections_per_identity = {MAX_CONNS}\n", 1)
            cfg.write_text(text + pg.state_toml())
            gws.append(Gateway(cfg))
            ports.append(port)
        yield {"pki": pki, "ports": ports, "gws": gws}
    finally:
        alive = [g.alive() for g in gws]
        for g in gws:
            g.stop()
        pg.close()
        assert all(alive)


def connected(pki: dict[str, Path], port: int, who: str) -> RawClient | None:
    """A raw client that the gateway served (None: it closed the connection)."""
    try:
        c = RawClient(None, sock=tls_socket(pki, port, who))
        c.initialize()
    except Exception:  # refused at the handshake, closed, or no reply
        return None
    return c


def test_an_identity_with_a_nul_does_not_turn_the_shared_quotas_off(
        nodes: dict[str, Any]) -> None:
    pki, (p1, p2), gws = nodes["pki"], nodes["ports"], nodes["gws"]
    held = [connected(pki, p1, "tenant-b") for _ in range(MAX_CONNS)]
    assert all(held)
    assert wait_for(lambda: connected(pki, p2, "tenant-b") is None, 5.0)
    nul = connected(pki, p2, "nul")  # its identity holds a NUL
    assert nul is not None, gws[1].log()[-2000:]
    extra = connected(pki, p2, "tenant-b")
    assert extra is None, "tenant B got a connection past its quota on node 2"
    assert "quotas counted in this process only" not in gws[1].log()

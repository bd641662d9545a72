"""CRLs for a chain: client certificates issued by an intermediate CA, with a CRL.

Before: the gateway checked the CRL for the client's own certificate only
(VERIFY_CRL_CHECK_LEAF) and took CRLs only from CAs in client_ca, so a client of an
intermediate (client ← intermediate ← root in client_ca) was refused whenever a CRL was
configured: its issuer's CRL could not be given (fail closed, but unusable). Now
``[tls] intermediate_ca`` names the intermediates, the CRL bundle holds one CRL per CA
(root and intermediates), each checked against its CA's key, and OpenSSL checks every
certificate of the chain (VERIFY_CRL_CHECK_CHAIN): a CA without a current CRL refuses
its clients.

PKI: root R (client_ca, the gateway's CA), intermediates I and J (issued by R, listed in
intermediate_ca), K (issued by R, not listed: no CRL). Clients: "root-app" (R),
"sub-app" and "sub-revoked" (I), "j-app" (J), "k-app" (K). Real `p11gate serve` on real
SoftHSM, raw TLS frames.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.adversarial.tls_pki import Authority
from tests.gateway_proc import Gateway, sign, wait_for
from tests.remote.tls_setup import free_port, open_config, refused, stop_checked, tls_signer
from tests.softhsm import make_token

from p11gate.remote import pem

PEM = serialization.Encoding.PEM


def _crl(ca: Authority, revoked: list[x509.Certificate], seconds: float = 7 * 86400,
         key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = now - dt.timedelta(seconds=max(2.0, 60 - seconds))  # before next_update
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.name)
         .last_update(issued)
         .next_update(now + dt.timedelta(seconds=seconds)))
    for c in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(
            c.serial_number).revocation_date(issued).build())
    return b.sign(key or ca.key, hashes.SHA256()).public_bytes(PEM)


class Pki:
    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.d = d
        self.root = Authority("Chain root")
        self.i = Authority("Chain sub I", parent=self.root)
        self.j = Authority("Chain sub J", parent=self.root)
        self.k = Authority("Chain sub K", parent=self.root)
        self.files: dict[str, Path] = {
            "ca": d / "ca.pem", "intermediates": d / "intermediates.pem", "crl": d / "crl.pem"}
        self.files["ca"].write_bytes(self.root.cert.public_bytes(PEM))
        self.files["intermediates"].write_bytes(
            self.i.cert.public_bytes(PEM) + self.j.cert.public_bytes(PEM))
        self.certs: dict[str, x509.Certificate] = {}
        server, skey = self.root.issue("gateway", server=True)
        self._write("server", server, skey, [])
        for client, ca in (("root-app", self.root), ("sub-app", self.i),
                           ("sub-revoked", self.i), ("j-app", self.j), ("k-app", self.k)):
            cert, key = ca.issue(client)
            self._write(client, cert, key, [] if ca is self.root else [ca.cert])

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
               chain: list[x509.Certificate]) -> None:
        self.certs[name] = cert
        self.files[f"{name}.pem"] = self.d / f"{name}.pem"
        self.files[f"{name}.pem"].write_bytes(b"".join(c.public_bytes(PEM)
                                                       for c in [cert, *chain]))
        self.files[f"{name}.key"] = self.d / f"{name}.key"
        self.files[f"{name}.key"].write_bytes(key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.files[f"{name}.key"].chmod(0o600)

    def bundle(self, *, root_revokes: list[x509.Certificate] | None = None,
               i_crl: bytes | None = None, with_i: bool = True) -> bytes:
        """R's CRL (revoking ``root_revokes``), I's (revoking sub-revoked, or ``i_crl``)
        and J's."""
        out = _crl(self.root, root_revokes or []) + _crl(self.j, [])
        if with_i:
            out += i_crl if i_crl is not None else _crl(self.i, [self.certs["sub-revoked"]])
        return out

    def publish(self, data: bytes, path: Path | None = None) -> Path:
        path = path or self.files["crl"]
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("crlchain") / "softhsm")


def _gateway(base: Path, token: dict[str, Any], pki: Pki, port: int) -> tuple[Gateway, Path]:
    files = {"server.pem": pki.files["server.pem"], "server.key": pki.files["server.key"],
             "ca": pki.files["ca"], "crl": pki.files["crl"]}
    cfg = open_config(base, token, files, port)
    cfg.write_text(cfg.read_text().replace(
        f'crl = "{pki.files["crl"]}"',
        f'intermediate_ca = "{pki.files["intermediates"]}"\ncrl = "{pki.files["crl"]}"\n'
        "crl_check_interval = 3600"))
    return Gateway(cfg), cfg


@pytest.fixture
def chain(token: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Pki, Gateway, int]]:
    pki = Pki(tmp_path / "pki")
    pki.publish(pki.bundle())
    port = free_port()
    gw, _cfg = _gateway(tmp_path / "gw", token, pki, port)
    yield pki, gw, port
    stop_checked(gw)


def _refusal(gw: Gateway, reason: str) -> bool:
    return any(r.get("msg") == "TLS client refused" and reason in r.get("reason", "")
               for r in gw.records())


def test_clients_of_an_intermediate_are_checked_against_its_crl(chain: Any) -> None:
    """sub-app (I, not revoked) and j-app (J) sign; sub-revoked (revoked in I's CRL) is
    refused; k-app (K: an intermediate with no CRL) is refused; root-app signs."""
    pki, gw, port = chain
    for client in ("sub-app", "j-app", "root-app"):
        c = tls_signer(pki.files, port, client)
        sign(*c)
        c[0].close()
    assert refused(pki.files, port, "sub-revoked")
    assert wait_for(lambda: _refusal(gw, "certificate revoked"))
    assert refused(pki.files, port, "k-app")
    assert wait_for(lambda: _refusal(gw, "unable to get certificate CRL")), gw.log()[-2000:]


def test_a_revoked_intermediate_refuses_its_clients_and_closes_their_connections(
        chain: Any) -> None:
    """The root's CRL revoking I (reloaded with SIGHUP): sub-app's established connection
    is closed, a new handshake refused; j-app's connection signs on."""
    pki, gw, port = chain
    sub = tls_signer(pki.files, port, "sub-app")
    j = tls_signer(pki.files, port, "j-app")
    time.sleep(1.1)  # a newer lastUpdate than the CRLs loaded at start
    pki.publish(pki.bundle(root_revokes=[pki.i.cert]))
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert sub[0].closed_by_peer(timeout=15), gw.log()[-2000:]
    assert refused(pki.files, port, "sub-app")
    sign(*j)
    assert not refused(pki.files, port, "j-app")
    sub[0].close()
    j[0].close()


def test_an_expired_intermediate_crl_refuses_its_clients(token: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """I's CRL valid for a few seconds: sub-app signs, then, once it has expired, its
    handshake is refused (root-app and j-app go on)."""
    pki = Pki(tmp_path / "pki")
    pki.publish(pki.bundle(i_crl=_crl(pki.i, [], seconds=6)))
    port = free_port()
    gw, _cfg = _gateway(tmp_path / "gw", token, pki, port)
    try:
        c = tls_signer(pki.files, port, "sub-app")
        sign(*c)
        c[0].close()
        assert wait_for(lambda: refused(pki.files, port, "sub-app"), timeout=20, interval=0.5)
        assert wait_for(lambda: _refusal(gw, "CRL has expired")), gw.log()[-2000:]
        assert not refused(pki.files, port, "root-app")
        assert not refused(pki.files, port, "j-app")
    finally:
        stop_checked(gw)


def test_a_missing_or_wrongly_signed_intermediate_crl_is_refused(tmp_path: Path) -> None:
    """check-config (and so start, reload and the watcher) refuses a bundle without I's
    CRL, with I's CRL expired, or with a CRL in I's name another key signed."""
    pki = Pki(tmp_path / "pki")
    ca, mid = str(pki.files["ca"]), str(pki.files["intermediates"])
    ok = pki.publish(pki.bundle(), tmp_path / "ok.pem")
    pem.check_crl(str(ok), ca, mid)
    missing = pki.publish(pki.bundle(with_i=False), tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="has no CRL for CN=Chain sub I"):
        pem.check_crl(str(missing), ca, mid)
    expired = pki.publish(pki.bundle(i_crl=_crl(pki.i, [], seconds=-60)),
                          tmp_path / "expired.pem")
    with pytest.raises(ValueError, match="expired"):
        pem.check_crl(str(expired), ca, mid)
    forged = pki.publish(pki.bundle(i_crl=_crl(pki.i, [], key=ec.generate_private_key(
        ec.SECP256R1()))), tmp_path / "forged.pem")
    with pytest.raises(ValueError, match="not signed by that CA's key"):
        pem.check_crl(str(forged), ca, mid)
    # an intermediate's CRL without intermediate_ca: not from a known CA
    with pytest.raises(ValueError, match="not from a CA"):
        pem.check_crl(str(ok), ca)
    # intermediate_ca must hold CAs that client_ca issued
    with pytest.raises(ValueError, match="not issued by a CA in client_ca"):
        pem.intermediates(mid, str(pki.files["server.pem"]))
    with pytest.raises(ValueError, match="is not a CA certificate"):
        pem.intermediates(str(pki.files["sub-app.pem"]), ca)


def test_a_wrongly_signed_intermediate_crl_is_not_loaded_while_running(
        chain: Any) -> None:
    """The bundle rewritten with a forged CRL of I (revoking sub-app) and a reload: the
    reload is refused, the CRLs in force stay, sub-app keeps its connection."""
    pki, gw, port = chain
    sub = tls_signer(pki.files, port, "sub-app")
    time.sleep(1.1)
    forged = _crl(pki.i, [pki.certs["sub-app"]], key=ec.generate_private_key(ec.SECP256R1()))
    pki.publish(pki.bundle(i_crl=forged))
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: "configuration reload refused" in gw.log()), gw.log()[-2000:]
    sign(*sub)
    assert not refused(pki.files, port, "sub-app")
    sub[0].close()



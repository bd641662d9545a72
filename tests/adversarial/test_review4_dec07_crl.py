"""Fourth review (CRLs): what a revocation does to a client already connected, and a CRL
under a client CA's name that another key signed.

A real gateway whose CRL file the test rewrites while it runs (the watcher checks it
every 0.2 s), raw TLS clients speaking p11-kit RPC, certificates made with
`cryptography`:

* OpenSSL checks the CRL at the handshake only: a client revoked later kept its
  established connection, and every key it could use, for as long as it stayed. The
  connections a newly loaded CRL revokes are now closed (the others go on).
* A CRL file that disappeared was ignored without a word (a restart would then fail).
* `check_crl` compared names only: a CRL with a client CA's name but signed by another
  key passed check-config and the watcher, and OpenSSL then refused that CA's clients.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.adversarial.hostile import call
from tests.gateway_proc import RawClient, wait_for
from tests.remote.crl_gateway import CrlGateway
from tests.remote.tls_setup import tls_socket
from tests.softhsm import make_token

from p11gate.remote import pem


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"token": make_token(tmp_path_factory.mktemp("crl") / "softhsm", keys=False)}


@pytest.fixture
def g(token: dict[str, Any], tmp_path: Path) -> Iterator[CrlGateway]:
    gw = CrlGateway(token, tmp_path, first_crl_days=7)
    yield gw
    alive = gw.gw.alive()
    gw.gw.stop()
    assert alive, gw.gw.log()[-3000:]


def connected(g: CrlGateway, client: str) -> RawClient:
    c = RawClient(None, sock=tls_socket(g.files, g.port, client))
    c.initialize()
    call(c, "C_GetSlotList", 1, 8)
    return c


def test_a_revocation_closes_the_established_connection(g: CrlGateway) -> None:
    keep, revoke = connected(g, "keep"), connected(g, "revoke")
    g.publish(["revoke"], days=7)
    assert wait_for(lambda: "CRL reloaded" in g.gw.log())
    # the revoked client's connection is closed by the gateway, not left to serve it
    assert revoke.closed_by_peer(timeout=15), g.gw.log()[-2000:]
    assert wait_for(lambda: "client certificate revoked by the CRL" in g.gw.log())
    # the other client is untouched, and the revoked one cannot come back
    (found,) = call(keep, "C_GetSlotList", 1, 8)
    assert len(found) == 1
    assert g.refused("revoke") and not g.refused("keep")
    keep.close()
    revoke.close()


def _forged_crl(g: CrlGateway) -> bytes:
    """A CRL in the gateway's CA's name, revoking "keep", signed by a key of nobody's."""
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(g.ca.name)
         .last_update(now - dt.timedelta(seconds=1)).next_update(now + dt.timedelta(days=7))
         .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(
             g.issued["keep"].serial_number).revocation_date(now).build()))
    return b.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def test_a_crl_in_a_client_cas_name_signed_by_another_key_is_not_loaded(
        g: CrlGateway) -> None:
    forged = g.tmp / "forged.pem"
    forged.write_bytes(_forged_crl(g))
    # check-config names it ...
    with pytest.raises(ValueError, match="not signed by that CA's key"):
        pem.check_crl(str(forged), str(g.files["ca"]))
    # ... and the running gateway does not load it: the previous CRL stays in force
    keep = connected(g, "keep")
    forged.replace(g.crl)
    assert wait_for(lambda: "CRL changed but not loaded" in g.gw.log()), g.gw.log()[-2000:]
    (found,) = call(keep, "C_GetSlotList", 1, 8)
    assert len(found) == 1
    assert not g.refused("keep")
    keep.close()


def test_a_crl_file_that_disappears_is_an_error_and_its_return_is_loaded(
        g: CrlGateway) -> None:
    keep = connected(g, "keep")
    saved = g.crl.read_bytes()
    g.crl.unlink()
    assert wait_for(lambda: "CRL file missing" in g.gw.log()), g.gw.log()[-2000:]
    # the CRL loaded before stays in force: the gateway goes on serving
    (found,) = call(keep, "C_GetSlotList", 1, 8)
    assert len(found) == 1 and not g.refused("keep")
    # the file back (with a revocation): loaded, and the revoked client's connection ends
    revoke = connected(g, "revoke")
    g.crl.write_bytes(saved)
    g.publish(["revoke"], days=7)
    assert revoke.closed_by_peer(timeout=15), g.gw.log()[-2000:]
    keep.close()
    revoke.close()


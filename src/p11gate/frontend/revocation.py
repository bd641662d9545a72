"""Established TLS connections whose certificate a newly loaded CRL revokes.

OpenSSL checks the CRL during the handshake only: a client revoked afterwards (a stolen
key, a tenant let go) kept its connection, and with it every key it could use, for as
long as it liked. When the CRL watcher loads a file (remote/tls.py ``watch_crl``) the
gateway closes the connections whose certificate (issuer name and serial number) it
lists, or any CA certificate of whose verified chain it lists (an intermediate revoked by
its issuer); their sessions end as for a client that hangs up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography import x509

from ..remote import pem
from ..remote.client_cas import verified_chain

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.server")


def close_revoked(connections: Iterable[ClientConnection], crl_path: str) -> int:
    """Close each TLS connection whose client certificate ``crl_path`` revokes; returns
    how many were closed."""
    try:
        gone = pem.revoked(crl_path)
    except ValueError:  # unreadable now: the watcher reports it; the next load retries
        return 0
    if not gone:
        return 0
    closed = 0
    for c in list(connections):
        t = c.transport
        ssl_object = t.get_extra_info("ssl_object") if t is not None else None
        if t is None or ssl_object is None or t.is_closing():
            continue
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            continue
        # the client's certificate and the CAs above it (not the trust anchor: a root
        # is not revoked by a CRL); without the verified chain, the client's alone
        chain = (verified_chain(ssl_object) or [der])[:-1] or [der]
        for cert_der in chain:
            cert = x509.load_der_x509_certificate(cert_der)
            if (cert.issuer.public_bytes(), cert.serial_number) in gone:
                c.close_revoked()
                closed += 1
                break
    return closed

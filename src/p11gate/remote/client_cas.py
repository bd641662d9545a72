"""Which client CA a verified client certificate belongs to.

OpenSSL accepts a client whose certificate chains to any CA in ``client_ca``; the
identity must say which, or a second CA could issue a certificate with the first CA's
tenant's subject and be that tenant. The CA of a connection is the first certificate
of the verified chain, going up from the client's own, that is in ``client_ca``: the
CA that issued it when that CA is listed (an intermediate and its root both listed:
the intermediate), else the listed root the client's intermediates lead to.

The verified chain comes from the ssl object (public ``get_verified_chain`` since
Python 3.13, the same method on the private ``_sslobj`` since 3.10). Without it, the
CA is the listed certificate whose subject is the client certificate's issuer and whose
key verifies its signature; a client certificate not issued directly by a listed CA is
then refused (fail closed).

CAs are told apart by public key: a CA certificate re-issued with the same key is the
same CA (same index, same id). Their order in the file matters: index 0, the first CA,
is the one ``[[rule]]``s without ``issuer`` apply to and whose identities keep the
``cert:<subject>`` key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
import weakref
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("p11gate.tls")


@dataclass(frozen=True)
class ClientCA:
    #: position among the distinct CAs of client_ca (0 = the first)
    index: int
    #: "sha256:" + 32 hex digits of the SHA-256 of the CA's SubjectPublicKeyInfo
    id: str
    #: RFC 4514 subject
    subject: str


def _key_id(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()[:32]


class ClientCAs:
    """The CAs of one ``client_ca`` file, in order."""

    def __init__(self, certs: list[x509.Certificate]) -> None:
        self.cas: list[ClientCA] = []
        self._by_der: dict[bytes, ClientCA] = {}
        self._certs: list[tuple[x509.Certificate, ClientCA]] = []
        by_key: dict[str, ClientCA] = {}
        for cert in certs:
            kid = _key_id(cert)
            ca = by_key.get(kid)
            if ca is None:
                ca = by_key[kid] = ClientCA(len(self.cas), kid, cert.subject.rfc4514_string())
                self.cas.append(ca)
            self._by_der[cert.public_bytes(serialization.Encoding.DER)] = ca
            self._certs.append((cert, ca))

    def of_chain(self, chain: list[bytes]) -> ClientCA | None:
        """The CA of a verified chain (DER, the client's certificate first)."""
        for der in [*chain[1:], *chain[:1]]:  # the leaf itself only if it is listed
            ca = self._by_der.get(der)
            if ca is not None:
                return ca
        return None

    def issuer_of(self, leaf: x509.Certificate) -> ClientCA | None:
        """The listed CA that signed ``leaf`` directly (name and signature checked)."""
        for cert, ca in self._certs:
            if cert.subject != leaf.issuer:
                continue
            with contextlib.suppress(InvalidSignature, TypeError, ValueError):
                leaf.verify_directly_issued_by(cert)
                return ca
        return None

    def ca_of(self, ssl_object: ssl.SSLObject | ssl.SSLSocket,
              leaf: x509.Certificate) -> ClientCA | None:
        chain = verified_chain(ssl_object)
        if chain is not None:
            return self.of_chain(chain)
        return self.issuer_of(leaf)

    def summary(self) -> str:
        """For check-config and the start-up log: each CA with its index and id."""
        return "; ".join(f"#{c.index} {c.subject} ({c.id})" for c in self.cas)


def verified_chain(ssl_object: object) -> list[bytes] | None:
    """The chain OpenSSL verified, DER, client's certificate first; None when this
    Python cannot tell."""
    get = getattr(ssl_object, "get_verified_chain", None)  # 3.13+: list of DER bytes
    if get is None:
        get = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if get is None:
        return None
    try:
        chain = get()
    except (ssl.SSLError, ValueError, AttributeError):
        return None
    if not chain:
        return None
    der_encoding = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 (private module)
    return [c if isinstance(c, bytes) else c.public_bytes(der_encoding) for c in chain]


#: each server context's client CAs (a context is made per TLS listener)
_registered: weakref.WeakKeyDictionary[ssl.SSLContext, ClientCAs] = (
    weakref.WeakKeyDictionary())


def register(ctx: ssl.SSLContext, cas: ClientCAs) -> None:
    _registered[ctx] = cas


def registered(ctx: object) -> ClientCAs | None:
    if not isinstance(ctx, ssl.SSLContext):
        return None
    return _registered.get(ctx)

"""TLS contexts and identities from certificates.

TLS 1.3 only, both ways. The gateway requires a client certificate that chains to the
configured trust anchors (and, with a CRL, is not revoked); the client side requires the
gateway's certificate to chain to its CA and match the address it dialled.
"""

from __future__ import annotations

import ssl

from cryptography import x509

from ..identity import Identity
from . import pem
from .config import TlsConfig


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cfg.cert, cfg.key, password=pem.no_passphrase)
    ctx.load_verify_locations(cafile=cfg.client_ca)
    if cfg.crl is not None:
        ctx.load_verify_locations(cafile=cfg.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The tunnel's and agent's context; ValueError names a bad file (checked first, so
    an encrypted key is an error, not a passphrase prompt in the application's terminal)."""
    for path, what in ((cert, "--cert"), (ca, "--ca")):
        try:
            pem.certificates(path)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    try:
        pem.check_key(key, cert)
    except ValueError as e:
        raise ValueError(f"--key: {e}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key, password=pem.no_passphrase)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                  address: str | None) -> Identity | None:
    """The identity of a verified client certificate, or None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)]
        sans += [f"URI:{n}" for n in ext.get_values_for_type(x509.UniformResourceIdentifier)]
        sans += [f"EMAIL:{n}" for n in ext.get_values_for_type(x509.RFC822Name)]
        sans += [f"IP:{n}" for n in ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return Identity(kind="tls", subject=cert.subject.rfc4514_string(), sans=tuple(sans),
                    address=address)


def parse_tls_address(address: str) -> tuple[str, int]:
    """``tls:HOST:PORT`` (``tls:[v6]:PORT`` for IPv6) → (host, port)."""
    if not address.startswith("tls:"):
        raise ValueError(f"{address!r}: expected tls:HOST:PORT")
    rest = address[4:]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected tls:HOST:PORT with a port 1-65535")
    return host.strip("[]"), int(port)

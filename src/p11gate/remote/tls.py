"""TLS contexts and identities from certificates.

TLS 1.3 only, both ways. The gateway requires a client certificate that chains to the
configured trust anchors (and, with a CRL, is not revoked); the client side requires the
gateway's certificate to chain to its CA and match the address it dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
from collections.abc import Callable
from typing import Protocol

from cryptography import x509

from ..identity import Identity
from . import pem
from .client_cas import ClientCAs, register, registered
from .config import TlsConfig

log = logging.getLogger("p11gate.tls")

#: the running CRL watcher of each listener, by id (a reference keeps each task alive;
#: one per listener: a reload replaces the listener's watcher, it does not add one)
_watchers: dict[int, asyncio.Task[None]] = {}


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cfg.cert, cfg.key, password=pem.no_passphrase)
    ctx.load_verify_locations(cafile=cfg.client_ca)
    # the same file, read for the identities: which CA each client chains to
    cas = ClientCAs(pem.certificates(cfg.client_ca))
    register(ctx, cas)
    if len(cas.cas) > 1:
        log.info("several client CAs: a rule without issuer matches only certificates "
                 "of the first; identities of the others are cert:<ca id>/<subject>",
                 extra={"client_ca": cfg.client_ca, "cas": cas.summary()})
    if cfg.crl is not None:
        ctx.load_verify_locations(cafile=cfg.crl)
        # every certificate of the chain, not the client's alone: a client of an
        # intermediate CA is checked against the intermediate's CRL, and the intermediate
        # against its issuer's; a CA in the chain without a current CRL refuses the client
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    return ctx


class Serving(Protocol):
    """A listener (asyncio server or TlsListener): the CRL is watched while it serves."""

    def is_serving(self) -> bool: ...


def watch_crl(server: Serving, ctx: ssl.SSLContext, cfg: TlsConfig,
              loaded: Callable[[str], None] | None = None) -> None:
    """Reload ``cfg.crl`` into the listener's context when the file changes, while the
    listener serves: new revocations apply to the next handshakes, and a fresh CRL
    replaces one that expires (an expired CRL refuses every client). OpenSSL keeps the
    CRLs it has loaded and uses the newest of each CA. A file that does not check out
    (junk, expired, foreign) is logged and not loaded; the previous CRL stays in force.
    A listener has one watcher: a new context (reload) stops the old one's.

    ``loaded(path)`` runs when the watcher starts (a reload gave the context the file
    as it is now) and after each CRL it loads: the gateway closes the established
    connections whose certificate the CRL revokes (a handshake checks only new ones)."""
    key = id(server)
    old = _watchers.pop(key, None)
    if old is not None:
        old.cancel()
    if cfg.crl is None:
        return
    task = asyncio.get_running_loop().create_task(
        _watch_crl(server, ctx, cfg, cfg.crl, loaded))
    _watchers[key] = task

    def done(t: asyncio.Task[None]) -> None:
        if _watchers.get(key) is t:
            del _watchers[key]

    task.add_done_callback(done)


def crl_watchers() -> int:
    """How many CRL watchers run (tests, status)."""
    return sum(not t.done() for t in _watchers.values())


def _file_version(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


async def _watch_crl(server: Serving, ctx: ssl.SSLContext, cfg: TlsConfig,
                     path: str, loaded: Callable[[str], None] | None) -> None:
    seen = _file_version(path)
    if loaded is not None:
        loaded(path)
    # each CA's latest nextUpdate among the CRLs loaded (OpenSSL keeps them all and
    # prefers one still valid, so a CA's clients are refused only when all have expired)
    valid_until: dict[str, dt.datetime] = {}

    def merge(due: dict[str, dt.datetime]) -> None:
        for ca, t in due.items():
            valid_until[ca] = max(t, valid_until.get(ca, t))

    with contextlib.suppress(ValueError):  # checked at start; it may have changed since
        merge(pem.check_crl(path, cfg.client_ca, cfg.intermediate_ca))
    warned: set[str] = set()
    while server.is_serving():
        await asyncio.sleep(cfg.crl_check_interval)
        now = _file_version(path)
        if now is None and seen is not None:
            # said once: a deleted (or unreadable) file is not an empty CRL; a restart
            # or a reload would refuse the configuration until it is back
            seen = None
            log.error("CRL file missing; the CRL loaded before stays in force, and a "
                      "restart or reload is refused until it is back", extra={"crl": path})
        elif now != seen and now is not None:
            seen = now
            try:
                due = pem.check_crl(path, cfg.client_ca, cfg.intermediate_ca)
                ctx.load_verify_locations(cafile=path)
            except (ValueError, ssl.SSLError) as e:
                log.error("CRL changed but not loaded; the previous one stays in force",
                          extra={"crl": path, "error": str(e)})
            else:
                merge(due)
                warned -= set(due)
                if loaded is not None:
                    loaded(path)
                log.info("CRL reloaded", extra={
                    "crl": path, "next_update": {k: str(v) for k, v in due.items()}})
        for ca, t in valid_until.items():
            if ca not in warned and t < dt.datetime.now(dt.UTC):
                warned.add(ca)
                log.error("CRL expired: every TLS client of this CA is refused until a "
                          "fresh CRL is published", extra={"crl": path, "ca": ca,
                                                           "next_update": str(t)})


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
    exposed = pem.key_exposure(key)
    if exposed:  # said, not refused: the tunnel runs as each application's user
        log.warning(f"--key: {exposed}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key, password=pem.no_passphrase)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                  address: str | None, cas: ClientCAs | None = None) -> Identity | None:
    """The identity of a verified client certificate, or None without one, or when
    its CA among ``cas`` (default: those of the ssl object's context, registered by
    :func:`server_context`) cannot be told (fail closed)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        subject, sans = cert.subject.rfc4514_string(), _sans(cert)
    except ValueError as e:
        # OpenSSL verifies some encodings cryptography refuses (BER where DER is due, a
        # duplicated extension ...): without this the exception escaped connection_made,
        # and each such client dumped a traceback past the log format and its rate limit
        log.warning("TLS client refused: its certificate does not parse as DER",
                    extra={"peer": address, "error": str(e)})
        return None
    if cas is None:
        cas = registered(getattr(ssl_object, "context", None))
    ca = cas.ca_of(ssl_object, cert) if cas is not None else None
    if ca is None:
        log.warning("TLS client refused: its CA in client_ca cannot be told (a client "
                    "certificate must be issued by a listed CA, or by an intermediate "
                    "it sends that a listed CA issued)",
                    extra={"peer": address, "subject": subject})
        return None
    return Identity(kind="tls", subject=subject, sans=tuple(sans),
                    address=address, issuer=ca.subject, ca_id=ca.id, ca_index=ca.index)


def _sans(cert: x509.Certificate) -> list[str]:
    """The certificate's SANs, typed (ValueError: the extensions do not parse)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)]
            + [f"URI:{n}" for n in ext.get_values_for_type(x509.UniformResourceIdentifier)]
            + [f"EMAIL:{n}" for n in ext.get_values_for_type(x509.RFC822Name)]
            + [f"IP:{n}" for n in ext.get_values_for_type(x509.IPAddress)])


def peer_address(peer: object) -> str | None:
    """``host:port`` of a socket peer (``[v6]:port`` for IPv6), for identities and logs."""
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_tls_address(address: str) -> tuple[str, int]:
    """``tls:HOST:PORT`` (``tls:[v6]:PORT`` for IPv6) → (host, port)."""
    if not address.startswith("tls:"):
        raise ValueError(f"{address!r}: expected tls:HOST:PORT")
    rest = address[4:]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected tls:HOST:PORT with a port 1-65535")
    return host.strip("[]"), int(port)

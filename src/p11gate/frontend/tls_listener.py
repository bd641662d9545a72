"""The TLS listener: accepts TCP connections and runs each TLS handshake itself.

A server made with ``create_server(ssl=…)`` drops a failed handshake without a word
(asyncio and uvloop log it only in debug mode), and a refused client -- no certificate,
an untrusted or revoked one, TLS 1.2 -- is a denial the operator must be able to see.
So the listener accepts plain sockets and hands each to ``connect_accepted_socket``,
which raises when the handshake fails; the failure is logged with the peer's address
and OpenSSL's reason. (``start_tls`` on an accepted transport would do too, but under
uvloop the ClientHello can reach the first protocol before reading pauses and is lost.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..remote.tls import peer_address

log = logging.getLogger("p11gate.server")

HANDSHAKE_TIMEOUT = 10.0
#: refusals logged one by one per second; the rest are counted
LOG_BURST = 20


class TlsListener:
    """Serves ``host:port`` over TLS with ``ctx``; ``factory`` makes each client's
    protocol, whose ``connection_made`` runs once its handshake has succeeded."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], ctx: ssl.SSLContext,
                 can_accept: Callable[[int], bool] | None = None) -> None:
        self.factory = factory
        self.ctx = ctx
        #: False when the gateway has no room for another connection (limits.py): the
        #: socket is closed at once, before any handshake holds memory and a descriptor
        self.can_accept = can_accept
        #: handshakes refused since start
        self.refused = 0
        #: the listen address it serves (metrics label)
        self.address = ""
        self._socks: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: handshakes under way: connections not yet admitted, counted against the limit
        self.handshaking = 0
        self._serving = False
        self._window = 0.0
        self._in_window = 0
        self._suppressed = 0

    async def start(self, host: str, port: int, backlog: int = 1024,
                    inherited: list[socket.socket] | None = None) -> None:
        """Listen on ``host:port``, or serve the ``inherited`` listening sockets (socket
        activation: systemd bound them) instead of binding new ones."""
        if inherited:
            for s in inherited:
                s.setblocking(False)
                self._socks.append(s)
            self._serving = True
            for s in self._socks:
                self._spawn(self._accept(s))
            return
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            # one socket per distinct address (getaddrinfo may repeat one)
            for family, type_, proto, addr in dict.fromkeys(
                    (i[0], i[1], i[2], i[4]) for i in infos):
                s = socket.socket(family, type_, proto)
                self._socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
                s.listen(backlog)
                s.setblocking(False)
        except OSError as e:
            self._close_sockets()
            raise OSError(e.errno, f"cannot listen on {host}:{port}: "
                                   f"{(e.strerror or str(e)).lower()}") from None
        self._serving = True
        for s in self._socks:
            self._spawn(self._accept(s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while self._serving:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and the like: do not spin, do not stop
                log.error("cannot accept a TLS connection", extra={"error": str(e)})
                await asyncio.sleep(0.1)
                continue
            self.adopt(sock)

    def start_handed(self) -> None:
        """Serve the connections another process accepts and hands over (the
        supervisor of ``[server] processes``, frontend/handoff.py)."""
        self._serving = True

    def adopt(self, sock: socket.socket) -> None:
        """Runs the handshake of an accepted connection, if there is room for it."""
        if not self._serving or (self.can_accept is not None
                                 and not self.can_accept(self.handshaking)):
            sock.close()
            return
        self.handshaking += 1
        self._spawn(self._handshake(sock))

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            await self._handshake_one(sock)
        finally:
            self.handshaking -= 1

    async def _handshake_one(self, sock: socket.socket) -> None:
        try:
            peer = peer_address(sock.getpeername()) or "?"
        except OSError:
            sock.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self.factory, sock, ssl=self.ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, TimeoutError, ValueError) as e:  # ssl.SSLError is an OSError
            sock.close()
            self.refused += 1
            self._log_refusal(peer, reason(e))

    def _log_refusal(self, peer: str, why: str) -> None:
        # a flood of bad handshakes must not flood the log: at most LOG_BURST records
        # per second, then one summary of how many were left out
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._suppressed:
                log.warning("TLS clients refused (not logged one by one)",
                            extra={"count": self._suppressed})
            self._window, self._in_window, self._suppressed = now, 0, 0
        self._in_window += 1
        if self._in_window > LOG_BURST:
            self._suppressed += 1
            return
        log.warning("TLS client refused", extra={"peer": peer, "reason": why})

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        self._serving = False
        for t in list(self._tasks):
            t.cancel()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        self._socks.clear()


def reason(e: BaseException) -> str:
    """Why a handshake failed, as OpenSSL puts it (alerts and verify results: nothing
    secret)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    if isinstance(e, TimeoutError):
        return "handshake timed out"
    return str(e) or type(e).__name__

"""Serves ``GET /metrics`` on the ``[metrics] listen`` address (TCP or a unix socket).

One asyncio server for both kinds of address, because prometheus_client's own HTTP
server cannot listen on a unix socket and reads the registry from its own threads. Here
the state half of the metrics is snapshotted on the event loop (where that state lives)
and the exposition text is rendered by prometheus_client's encoder in a worker thread, so
a scrape never holds the loop for the rendering. Only the request line and headers are
parsed here; the body is prometheus_client's (text or OpenMetrics, by ``Accept``).

The endpoint is on a management path, not a client path, and must not cost the clients
anything when it is abused: at most ``MAX_CLIENTS`` connections at once (more are closed
at once), a request head of at most ``MAX_HEAD`` bytes that must arrive within
``HEAD_TIMEOUT`` seconds, one request per connection, one rendering at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .metrics import GatewayMetrics, Snapshot
from .metrics_config import MetricsConfig, parse_tcp
from .unix_socket import BoundSocket, bind_unix, make_socket_dir

log = logging.getLogger("p11gate.metrics")

MAX_CLIENTS = 32
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0


#: where a scrape's samples come from, given whether they are wanted per process: a
#: registry to render (the supervisor of [server] processes: every child's, merged)
Source = Callable[[bool], Awaitable[CollectorRegistry]]


class MetricsServer:
    def __init__(self, address: str, metrics: GatewayMetrics | None = None,
                 snapshot: Callable[[], Snapshot] | None = None,
                 source: Source | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        """One gateway's ``metrics`` with its state ``snapshot`` (made on the loop), or
        another ``source`` of registries."""
        self.address = address
        self.metrics = metrics
        self.snapshot = snapshot
        self.source = source
        #: HTTPS (metrics_tls_context); None: plain HTTP
        self.tls = tls
        #: where it listens, with the real port when the configured one was 0
        self.bound = address
        self.scrapes = 0
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._bound_socket: BoundSocket | None = None
        self._active = 0
        self._render = asyncio.Lock()

    async def start(self) -> None:
        if self.address.startswith("unix:"):
            path = urllib.parse.unquote(self.address.removeprefix("unix:path="))
            make_socket_dir(path)
            # mode 0600: the daemon's user only (put a proxy in front for a scraper)
            self._bound_socket = bind_unix(path, 0o600, "metrics socket")
            self._server = await asyncio.start_unix_server(
                self._handle, sock=self._bound_socket.sock, limit=MAX_HEAD)
        else:
            host, port = parse_tcp(self.address)
            self._server = await asyncio.start_server(
                self._handle, host, port, limit=MAX_HEAD, reuse_address=True, ssl=self.tls,
                ssl_handshake_timeout=HEAD_TIMEOUT if self.tls is not None else None)
            sockname = self._server.sockets[0].getsockname()
            shown = f"[{host}]" if ":" in host else host
            self.bound = f"{shown}:{sockname[1]}"
        log.info("metrics listening", extra={"address": self.bound,
                                             "tls": self.tls is not None})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self._bound_socket is not None:
            self._bound_socket.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CLIENTS:
            self.refused += 1
            writer.transport.abort()
            return
        self._active += 1
        try:
            await self._serve_one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the scraper went away or stalled: nothing to answer
        finally:
            self._active -= 1
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            await self._send(writer, 431, "request head too large\n")
            return
        except asyncio.IncompleteReadError as e:
            if e.partial:
                await self._send(writer, 400, "incomplete request\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._send(writer, 400, "bad request line\n")
            return
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, "only GET /metrics\n")
            return
        path, _, query = target.partition("?")
        if path != "/metrics":
            await self._send(writer, 404, "try /metrics\n")
            return
        per_process = urllib.parse.parse_qs(query).get("per_process", ["0"])[-1] in (
            "1", "true", "yes")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        async with self._render:
            registry = await self._registry(per_process)
            body = await asyncio.to_thread(encoder, registry)  # rendered off the loop
        self.scrapes += 1
        await self._send(writer, 200, body, content_type, head_only=method == "HEAD")

    async def _registry(self, per_process: bool) -> CollectorRegistry:
        if self.source is not None:
            return await self.source(per_process)
        assert self.metrics is not None and self.snapshot is not None
        self.metrics.state.snapshot = self.snapshot()  # state read on the loop
        return self.metrics.registry

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes | str,
                    content_type: str = "text/plain; charset=utf-8",
                    head_only: bool = False) -> None:
        data = body.encode() if isinstance(body, str) else body
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed", 431: "Request Header Fields Too Large"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        if not head_only:
            writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def metrics_tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The HTTPS context of ``[metrics] tls_cert``/``tls_key`` (and ``tls_client_ca``:
    client certificates required). Raises OSError / ssl.SSLError on a bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_for(cfg: MetricsConfig) -> ssl.SSLContext | None:
    """``[metrics]``'s HTTPS context, or None (plain HTTP)."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    return metrics_tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)

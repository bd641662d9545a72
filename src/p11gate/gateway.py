"""The gateway, the composition root: it makes the back ends (module, soft, pool), the
virtual tokens, the listeners, and holds the live connections.

It sits above the frontend (cli → daemon → gateway → frontend → backends → codec): the
frontend's modules only name it as a type."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from .admin import AdminServer, admin_socket_path
from .audit import AuditLog
from .backends.base import Backend
from .backends.factory import make_backend
from .backends.pool.pool import PoolBackend
from .config import Config
from .errors import Pkcs11Error
from .frontend.connection import ClientConnection
from .frontend.fair_share import FairShares
from .frontend.handoff import Receiver
from .frontend.layer_views import LayerViews
from .frontend.metrics_state import snapshot
from .frontend.quotas import GatewayLimits, raise_fd_limit
from .frontend.revocation import close_revoked
from .frontend.shared_usage import SharedUsage
from .frontend.status_info import StartTime, gateway_header, token_extras
from .frontend.tls_listener import TlsListener
from .frontend.token import VirtualToken
from .identity import Identity
from .metrics import GatewayMetrics
from .metrics_merge import Family, export
from .policy import Policy
from .policy.namespace import OwnershipStore
from .remote.tls import (
    parse_tls_address,
    peer_address,
    peer_identity,
    server_context,
    watch_crl,
)
from .state import open_store
from .systemd import Inherited, keep_socket_file
from .unix_socket import BoundSocket, bind_unix, make_socket_dir

log = logging.getLogger("p11gate.server")


def unix_path(address: str) -> str:
    return urllib.parse.unquote(address.removeprefix("unix:path="))


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = StartTime()
        #: the Prometheus registry (served by metrics_http when [metrics] listen is set)
        self.metrics = GatewayMetrics()
        self.registry = open_store(cfg.state, cfg.server.state_dir)
        self.registry.shared = (cfg.state.engine != "sqlite" or cfg.state.path is not None
                                or cfg.server.process_count() > 1)
        # this process on the store: its host and the directory of its admin socket
        # (one live process each; the same after a restart)
        admin_dir = os.path.dirname(admin_socket_path(cfg.server.state_dir,
                                                      cfg.server.admin_socket))
        self.registry.holder = f"{socket.gethostname()}:{os.path.realpath(admin_dir)}"
        self.backends: dict[str, Backend] = {b.name: make_backend(b, self.registry)
                                             for b in cfg.backend}
        self.ownership = OwnershipStore(self.registry)
        #: connection, session and object quotas; the file descriptor reserve
        self.limits = GatewayLimits(cfg.server, self.ownership)
        if self.registry.shared:  # other processes or nodes: one quota for all of them
            self.limits.shared = SharedUsage(self.registry)
        self.policy = Policy(cfg.rule)
        audit_path = None
        if cfg.audit.enabled:
            audit_path = cfg.audit.file or os.path.join(cfg.server.state_dir, "audit.jsonl")
        self.audit = AuditLog(audit_path, cfg.audit.required)
        self.pools: dict[str, PoolBackend] = {
            p.name: PoolBackend(p, self.backends, self.registry) for p in cfg.pool}
        served: dict[str, Backend] = {**self.backends, **self.pools}
        self.tokens = [VirtualToken(t, served[t.backend], self.registry) for t in cfg.token]
        self.tokens_by_slot = {t.slot_id: t for t in self.tokens}
        #: per-identity tokens of layered soft back ends (layer_views.py)
        self.layer_views = LayerViews(self)
        self.fair_share = FairShares(cfg, served)
        self.connections: set[ClientConnection] = set()
        self.background: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer | TlsListener] = []
        self.admin: AdminServer | None = None
        self._sockets: list[BoundSocket] = []
        #: listening sockets passed by systemd (socket activation), claimed by _listen
        self.inherited = Inherited()
        #: a process of ``[server] processes``: the supervisor accepts and hands each
        #: connection over (frontend/handoff.py); the process binds no listener
        self.handoff: Receiver | None = None
        #: configuration reloads done and refused since start (p11gate.reload sets the
        #: hook: the daemon knows the file)
        self.reloads = 0
        self.reload_failures = 0
        self.on_reload: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        for b in self.backends.values():
            b.on_restart = self._reattach_hook(b)

    def _reattach_hook(self, backend: Backend) -> Any:
        async def hook() -> None:
            for t in self.tokens:
                if t.backend is backend:
                    try:
                        await t.attach()
                    except Pkcs11Error as e:
                        log.error("token unavailable after restart",
                                  extra={"token": t.name, "error": str(e)})

        return hook

    async def start(self) -> None:
        raise_fd_limit()  # systemd's soft limit of 1024 is too few for a gateway
        if self.limits.shared is not None:
            self.limits.shared.start(self.limits.counts)
        for b in self.backends.values():
            try:
                await b.start()
            except Pkcs11Error as e:
                # one backend down must not stop the others; it retries by itself
                log.error("backend failed to start", extra={"backend": b.name, "error": str(e)})
        for p in self.pools.values():
            await p.start()  # after its members' back ends
        for t in self.tokens:
            if t.backend.up:
                try:
                    await t.attach()
                except Pkcs11Error as e:
                    log.error("token not attached", extra={"token": t.name, "error": str(e)})
        for index, address in enumerate(self.cfg.server.listen):
            if self.handoff is not None:
                self._serve_handed(index, address)
            else:
                await self._listen(address)
        if self.handoff is not None:
            self.handoff.start()
        self.admin = AdminServer(
            admin_socket_path(self.cfg.server.state_dir, self.cfg.server.admin_socket),
            self.status, self._admin_reload, self._metrics_families,
        )
        await self.admin.start()

    def _metrics_families(self) -> list[Family]:
        """This process's samples, for the supervisor's merged /metrics."""
        self.metrics.state.snapshot = snapshot(self)
        return export(self.metrics.registry)

    async def _admin_reload(self, requested_by: str) -> dict[str, Any]:
        if self.on_reload is None:
            return {"ok": False, "error": "this gateway cannot reload"}
        return await self.on_reload(requested_by)

    async def _listen(self, address: str) -> None:
        if address.startswith("tls:"):
            await self._listen_tls(address)
            return
        path = unix_path(address)
        # socket activation: systemd bound it (and keeps it: never unlinked by us)
        sock = self.inherited.take_unix(path)
        activated = sock is not None
        if sock is None:
            make_socket_dir(path)
            # never takes over (or later deletes) the socket of another live gateway
            bound = bind_unix(path, self.cfg.server.socket_mode)
            self._sockets.append(bound)
            sock = bound.sock
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: self._new_connection(address), sock=sock, backlog=1024,
            **(keep_socket_file(loop) if activated else {}),
        )
        self._servers.append(server)
        log.info("listening", extra={"address": address, "from_systemd": activated})

    def _serve_handed(self, index: int, address: str) -> None:
        """The connections to ``address`` the supervisor accepts and hands over."""
        assert self.handoff is not None
        if address.startswith("tls:"):
            listener = self._tls_listener(address)
            listener.start_handed()
            self.handoff.serve(index, listener.adopt)
            return
        loop = asyncio.get_running_loop()

        def adopt(sock: socket.socket) -> None:
            task = loop.create_task(loop.connect_accepted_socket(
                lambda: self._new_connection(address), sock))
            self.background.add(task)
            task.add_done_callback(self._adopted(sock))

        self.handoff.serve(index, adopt)
        log.info("serving handed connections", extra={"address": address})

    def _adopted(self, sock: socket.socket) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            self.background.discard(task)
            if task.cancelled() or task.exception() is not None:
                sock.close()  # closed by its peer already, or the gateway is stopping
        return done

    def _tls_listener(self, address: str) -> TlsListener:
        assert self.cfg.tls is not None  # the configuration checks it
        ctx = server_context(self.cfg.tls)
        listener = TlsListener(lambda: _TlsClientConnection(self, address), ctx,
                               can_accept=self.limits.can_accept)
        listener.address = address
        watch_crl(listener, ctx, self.cfg.tls, self.crl_loaded)
        self._servers.append(listener)
        return listener

    async def _listen_tls(self, address: str) -> None:
        host, port = parse_tls_address(address)
        listener = self._tls_listener(address)
        await listener.start(host, port, inherited=self.inherited.take_tcp(host, port))
        log.info("listening", extra={"address": address, "tls": "1.3, client certificates"})

    def crl_loaded(self, path: str) -> None:
        """A CRL was (re)loaded: established connections it revokes are closed."""
        close_revoked(self.connections, path)

    def _new_connection(self, listener: str) -> ClientConnection:
        c = ClientConnection(self)
        c.listener = listener
        self.connections.add(c)
        if self.handoff is not None:
            self.handoff.report()
        self.metrics.connections_accepted.labels(listener).inc()
        return c

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.limits.release(conn)
        if self.handoff is not None:
            self.handoff.report()

    def identify(self, transport: asyncio.Transport) -> Identity | None:
        """The identity of a new connection, or None when it has none (then it is
        closed before any call is served)."""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            peer = transport.get_extra_info("peername")
            address = peer_address(peer)
            return peer_identity(ssl_object, address)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", creds)
                return Identity(kind="unix", uid=uid, gid=gid, pid=pid)
            except OSError:
                return None
        return None

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.handoff is not None:
            self.handoff.close()
        for s in self._servers:
            s.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)
        if self.background:
            await asyncio.wait(self.background, timeout=3)
        for p in self.pools.values():
            await p.stop()
        for b in self.backends.values():
            await b.stop()
        self.audit.close()
        if self.limits.shared is not None:
            self.limits.shared.stop()
        self.registry.close()
        for bound in self._sockets:
            bound.unlink()  # only the files this gateway created

    def status(self) -> dict[str, Any]:
        return {
            **gateway_header(self, self.started),  # version, uptime, listeners
            "connections": len(self.connections),
            "clients": sorted({c.peer for c in self.connections}),
            "audit_records": self.audit.records,
            "audit_failures": self.audit.failures,
            # closed at once: beyond max_connections(_per_identity) or the fd reserve
            "connections_refused": self.limits.refused,
            # handshakes refused: no certificate, untrusted, revoked, old protocol
            "tls_refused": sum(s.refused for s in self._servers
                               if isinstance(s, TlsListener)),
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "backends": [b.describe() for b in self.backends.values()],
            "pools": [p.describe() for p in self.pools.values()],
            "fair_share": self.fair_share.describe(),
            "tokens": [
                {"name": t.name, "slot": t.slot_id, "backend": t.backend.name,
                 "present": t.present, "pin_mode": t.pin_mode,
                 "logged_in_clients": len(t.login.holders),
                 "owned_objects": self.ownership.count(t.name),
                 "last_error": t.last_error, **token_extras(t)}
                for t in self.tokens
            ],
        }


class _TlsClientConnection(ClientConnection):
    """A TLS client joins the gateway's connections once its handshake has succeeded
    (connection_made is not called for a refused one, nor connection_lost)."""

    def __init__(self, gateway: Gateway, listener: str) -> None:
        super().__init__(gateway)
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gw.connections.add(self)
        if self.gw.handoff is not None:
            self.gw.handoff.report()
        self.gw.metrics.connections_accepted.labels(self.listener).inc()
        super().connection_made(transport)

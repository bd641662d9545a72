"""Limits that keep one client from exhausting the gateway (DESIGN decision 9).

* :class:`ConnectionFlow` -- back-pressure per connection: the gateway reads no more of a
  connection while it has ``max_calls_in_flight`` calls being served, or while its
  unsent replies plus the output bytes promised to its calls in flight exceed
  ``max_pending_reply_bytes``; it reads on when they are answered and read. A request
  frame must arrive within ``frame_timeout`` of its first byte.
* :class:`GatewayLimits` -- connections overall and per identity, a reserve of file
  descriptors, sessions per connection and identity, session objects per connection and
  token objects per identity.
* :func:`raise_fd_limit` -- the soft RLIMIT_NOFILE raised to the hard one at start.

A limit that is hit gives the PKCS#11 code for it (or a closed connection) and a log
record, through :class:`LogLimiter` so that a flood does not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import ck
from ..codec import AttrRequest, FrameReader, ProtocolError, ckr
from ..config import ServerConfig
from ..errors import Pkcs11Error
from .common import ID, attr_bool
from .tables import ATTR_REQUEST_ARG, CAPACITY_ARGS, CREATE_TEMPLATES, NEW_OBJECTS

if TYPE_CHECKING:
    from ..identity import Identity
    from ..policy.namespace import OwnershipStore
    from .connection import ClientConnection
    from .handles import ObjectRef
    from .token import VirtualToken

log = logging.getLogger("p11gate.limits")

#: a reply's frame header and fixed fields, beyond the output buffers it carries
_REPLY_OVERHEAD = 64
#: what a call costs while in flight besides its buffers (task, decoded arguments)
_CALL_OVERHEAD = 1024
#: at max_calls_in_flight with none answered for this long, the calls in flight may be
#: waiting for requests not read yet (an operation's next step holds a pool session
#: another one waits for): read on, bounded by max_pending_reply_bytes alone
STALL_SECONDS = 0.5
#: a capacity of 0xFFFFFFFF asks only for the size (no buffer)
_SIZE_QUERY = 0xFFFFFFFF


class LogLimiter:
    """At most ``burst`` records per ``period`` seconds for each message and limit; the
    rest are counted and summarised in one record at the end of the window."""

    def __init__(self, logger: logging.Logger, burst: int = 20, period: float = 1.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        #: (message, limit) -> [window start, records in window, suppressed in window]
        self._windows: dict[tuple[str, Any], list[float]] = {}

    def warning(self, msg: str, **fields: Any) -> None:
        self.record(logging.WARNING, msg, **fields)

    def info(self, msg: str, **fields: Any) -> None:
        self.record(logging.INFO, msg, **fields)

    def record(self, level: int, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        key = (msg, fields.get("limit"))
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.period:
            if w is not None:
                self._flush(key, level)
            w = self._windows[key] = [now, 0, 0]
        w[1] += 1
        if w[1] <= self.burst:
            self.logger.log(level, msg, extra=fields)
            return
        w[2] += 1
        if w[2] == 1:
            with contextlib.suppress(RuntimeError):  # no loop: summarised at the next one
                asyncio.get_running_loop().call_later(self.period, self._flush, key, level)

    def _flush(self, key: tuple[str, Any], level: int) -> None:
        w = self._windows.get(key)
        if w is not None and w[2]:
            msg, limit = key
            self.logger.log(level, f"{msg} (more, not logged one by one)",
                            extra={"count": int(w[2]), "seconds": self.period,
                                   "limit": limit})
            w[2] = 0


limited_log = LogLimiter(log)


def reply_promise(call_id: int, args: list[Any], max_buffer: int) -> int:
    """The most bytes a call's reply can carry: its output buffers (each clamped to
    max_buffer, as the frontend clamps them) or attribute buffers it asks for."""
    n = _REPLY_OVERHEAD
    caps = CAPACITY_ARGS.get(call_id)
    if caps is not None:
        for pos, item in caps:
            cap = args[pos] if pos < len(args) else 0
            if isinstance(cap, int) and cap != _SIZE_QUERY:
                n += min(cap * item, max_buffer)
        return n
    at = ATTR_REQUEST_ARG.get(call_id)
    if at is not None and at < len(args) and isinstance(args[at], list):
        n += min(_requested_bytes(args[at]), max_buffer)
    return n


def _requested_bytes(reqs: list[AttrRequest]) -> int:
    return sum(r.length + (_requested_bytes(r.nested) if r.nested else 0) for r in reqs)


class IdentityUsage:
    """Memory the connections of one identity hold in the gateway."""

    __slots__ = ("buffered", "connections")

    def __init__(self) -> None:
        self.buffered = 0
        self.connections: set[ClientConnection] = set()


class ConnectionFlow:
    """Back-pressure and the frame deadline for one connection.

    Frames are taken from the :class:`FrameReader` one at a time while the connection
    is not blocked; once it is, reading is paused and the frames already received stay
    in the reader (at most one read chunk plus one partial frame) until calls finish
    and the client reads its replies."""

    def __init__(self, cfg: ServerConfig, reader: FrameReader, conn_id: int,
                 dispatch: Callable[[int, bytes], None],
                 abort: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.reader = reader
        self.conn_id = conn_id
        self._dispatch = dispatch
        #: closes the connection (the reason is logged, rate-limited, by the caller)
        self._abort = abort
        self.transport: asyncio.Transport | None = None
        #: shared by the connections of this identity (set when admitted)
        self.usage: IdentityUsage | None = None
        #: this connection's part of usage.buffered
        self._held = 0
        self.in_flight = 0
        #: output bytes promised to calls in flight
        self.promised = 0
        #: call code -> promises of the calls in flight with that code (a hostile
        #: client may reuse codes; the smallest is released first: never an undercount)
        self._promises: dict[int, list[int]] = {}
        self.writer_paused = False
        self.reading_paused = False
        self._receiving = False
        self._timer: asyncio.TimerHandle | None = None
        #: the count bound is lifted (see STALL_SECONDS) until in flight is below it
        self._over_cap = False
        self._progress = 0.0
        self._stall: asyncio.TimerHandle | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        high = self.cfg.max_pending_reply_bytes
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=high, low=high // 4)

    # -- accounting of calls

    def started(self, code: int, call_id: int, args: list[Any], size: int = 0) -> None:
        """A call of ``size`` request bytes is being served."""
        p = reply_promise(call_id, args, self.cfg.max_buffer) + size + _CALL_OVERHEAD
        self.in_flight += 1
        self.promised += p
        self._promises.setdefault(code, []).append(p)

    def finished(self, code: int) -> None:
        ps = self._promises.get(code)
        if not ps:
            return
        p = min(ps)
        ps.remove(p)
        if not ps:
            del self._promises[code]
        self.in_flight -= 1
        self.promised -= p
        self._progress = time.monotonic()
        if self._over_cap and self.in_flight < self.cfg.max_calls_in_flight:
            self._over_cap = False
        self._maybe_resume()

    def blocked(self) -> bool:
        if self.writer_paused:
            return True
        if self.in_flight >= self.cfg.max_calls_in_flight and not self._over_cap:
            return True
        t = self.transport
        unsent = t.get_write_buffer_size() if t is not None else 0
        return self.promised + unsent > self.cfg.max_pending_reply_bytes

    # -- transport hooks

    def pause_writing(self) -> None:
        self.writer_paused = True
        self._pause()
        self._account()

    def resume_writing(self) -> None:
        self.writer_paused = False
        self._account()
        self._maybe_resume()

    def _account(self) -> None:
        """Update this connection's part of its identity's buffered bytes; close it
        when that takes the identity beyond max_buffered_bytes_per_identity (many
        stalled frames or unread replies at once are an attack, not a workload)."""
        u = self.usage
        if u is None:
            return
        held = self.reader.pending()
        if self.writer_paused:
            held += self.cfg.max_pending_reply_bytes
        delta = held - self._held
        if not delta:
            return
        self._held = held
        u.buffered += delta
        if delta > 0 and u.buffered > self.cfg.max_buffered_bytes_per_identity:
            limited_log.warning("closing client connection: limit reached",
                                conn=self.conn_id, limit="max_buffered_bytes_per_identity",
                                value=self.cfg.max_buffered_bytes_per_identity)
            self.release()
            if self.transport is not None:
                self.transport.abort()

    def release(self) -> None:
        """The connection is gone: its bytes no longer count."""
        if self.usage is not None:
            self.usage.buffered -= self._held
            self._held = 0
            self.usage = None

    def receive(self, data: bytes) -> None:
        """Take frames from ``data`` (and what is buffered) while not blocked. Raises
        the reader's ProtocolError."""
        self._receiving = True
        done = 0
        # buffered first: a generator's body (which would add it) runs only when a
        # frame is asked for, and a blocked connection asks for none
        self.reader.add(data)
        frames = self.reader.feed(b"")
        try:
            while not self.blocked():
                frame = next(frames, None)
                if frame is None:
                    break
                done += 1
                self._dispatch(frame.code, frame.body)
        finally:
            frames.close()
            self._receiving = False
        if self._held or self.reader.pending() > 65536:
            self._account()  # cheap enough for every chunk of a big frame
        if self.blocked():
            self._pause()
        else:
            self._deadline(done)

    def _pause(self) -> None:
        if self.reading_paused or self.transport is None:
            return
        self.reading_paused = True
        self._cancel_timer()  # what is not read yet cannot be late
        if not self.transport.is_closing():
            self.transport.pause_reading()
        # ordinary flow control for a client that pipelines a lot: info, not a warning
        if self.in_flight >= self.cfg.max_calls_in_flight and not self._over_cap:
            limited_log.info("connection paused: calls in flight at the limit",
                             conn=self.conn_id, limit="max_calls_in_flight")
            self._watch_stall()
        else:
            limited_log.info("connection paused: replies not read by the client",
                             conn=self.conn_id, limit="max_pending_reply_bytes",
                             unsent=self.transport.get_write_buffer_size(),
                             promised=self.promised)

    def _maybe_resume(self) -> None:
        if not self.reading_paused or self._receiving or self.blocked():
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        self.reading_paused = False
        t.resume_reading()
        try:
            self.receive(b"")  # the frames received before the pause
        except ProtocolError as e:
            # a bad frame behind the pause: the same as when it arrived
            self._abort(f"protocol error: {e}")

    def _watch_stall(self) -> None:
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(STALL_SECONDS,
                                                                self._stalled)

    def _stalled(self) -> None:
        self._stall = None
        if not self.reading_paused or self.in_flight < self.cfg.max_calls_in_flight:
            return
        if time.monotonic() - self._progress < STALL_SECONDS:
            self._watch_stall()  # calls are being answered: the bound holds
            return
        self._over_cap = True
        limited_log.info("connection resumed over max_calls_in_flight: none answered for "
                         f"{STALL_SECONDS} s (they may wait for requests not read yet)",
                         conn=self.conn_id, limit="max_calls_in_flight",
                         in_flight=self.in_flight)
        self._maybe_resume()

    # -- the frame deadline

    def _deadline(self, done: int) -> None:
        if self.reader.pending() == 0:
            self._cancel_timer()
        elif self._timer is None or done:
            # a frame has begun: it has frame_timeout from its first byte
            self._cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(
                self.cfg.frame_timeout, self._late)

    def _late(self) -> None:
        self._timer = None
        if self.reader.pending() and not self.reading_paused:
            limited_log.warning("closing client connection: request frame not complete "
                                "in time", conn=self.conn_id, limit="frame_timeout",
                                seconds=self.cfg.frame_timeout,
                                buffered=self.reader.pending())
            if self.transport is not None:
                self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._cancel_timer()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.release()


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open files limit",
                        extra={"soft": soft, "hard": hard, "error": str(e)})
    log.info("open files limit", extra={"nofile": soft, "hard": hard})
    return soft


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class GatewayLimits:
    """Connections, sessions and objects per identity; the file descriptor reserve."""

    def __init__(self, cfg: ServerConfig, ownership: OwnershipStore) -> None:
        self.cfg = cfg
        self.ownership = ownership
        self.by_identity: dict[str, IdentityUsage] = {}
        self._key_of: dict[int, str] = {}
        self.refused = 0
        #: sessions being opened per identity (not in a handle table yet)
        self._opening: Counter[str] = Counter()
        #: per connection id: session objects it made -> (token, session handle)
        self._session_objects: dict[int, dict[tuple[int, int, int],
                                              tuple[VirtualToken, int]]] = {}
        #: token objects made by identities whose namespace does not record ownership:
        #: (token, class, id, label) -> identity key; and the count per identity
        self._made: dict[tuple[str, int, bytes, bytes], str] = {}
        self._made_by: Counter[str] = Counter()

    # -- connections and file descriptors

    def admit(self, conn: ClientConnection, ident: Identity) -> bool:
        key = ident.key
        mine = self.by_identity.get(key)
        why = None
        if len(self._key_of) >= self.cfg.max_connections:
            why = "max_connections"
        elif mine is not None and len(mine.connections) >= \
                self.cfg.max_connections_per_identity:
            why = "max_connections_per_identity"
        elif self.fds_short():
            why = "fd_reserve"
        if why is not None:
            self.refused += 1
            limited_log.warning("connection refused: limit reached", limit=why,
                                peer=ident.describe())
            return False
        if mine is None:
            mine = self.by_identity[key] = IdentityUsage()
        mine.connections.add(conn)
        conn.flow.usage = mine
        self._key_of[conn.id] = key
        return True

    def release(self, conn: ClientConnection) -> None:
        key = self._key_of.pop(conn.id, None)
        self._session_objects.pop(conn.id, None)
        if key is None:
            return
        conn.flow.release()
        mine = self.by_identity.get(key)
        if mine is not None:
            mine.connections.discard(conn)
            if not mine.connections:
                del self.by_identity[key]

    def fds_short(self) -> bool:
        """Fewer than fd_reserve descriptors free (counted only when it could be so)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return False
        if 2 * len(self._key_of) + 4 * self.cfg.fd_reserve < soft:
            return False  # far from it: spare the /proc read
        return soft - open_fds() < self.cfg.fd_reserve

    def can_accept(self) -> bool:
        """For listeners that accept sockets themselves (TLS, before the handshake)."""
        if len(self._key_of) >= self.cfg.max_connections or self.fds_short():
            self.refused += 1
            limited_log.warning("connection refused: limit reached",
                                limit="fd_reserve" if len(self._key_of)
                                < self.cfg.max_connections else "max_connections")
            return False
        return True

    # -- sessions

    @contextlib.contextmanager
    def opening_session(self, conn: ClientConnection) -> Iterator[None]:
        """Around C_OpenSession: CKR_SESSION_COUNT when the connection or its identity
        has its quota of sessions (counting opens under way)."""
        key = conn.identity.key
        usage = self.by_identity.get(key)
        conns = usage.connections if usage is not None else {conn}
        if len(conn.handles.sessions) >= self.cfg.max_sessions_per_connection:
            _prune_dead_sessions(conn)
            if len(conn.handles.sessions) >= self.cfg.max_sessions_per_connection:
                self._hit(conn, "max_sessions_per_connection", ckr.SESSION_COUNT)
        total = self._opening[key] + sum(len(c.handles.sessions) for c in conns)
        if total >= self.cfg.max_sessions_per_identity:
            for c in conns:
                _prune_dead_sessions(c)
            total = self._opening[key] + sum(len(c.handles.sessions) for c in conns)
            if total >= self.cfg.max_sessions_per_identity:
                self._hit(conn, "max_sessions_per_identity", ckr.SESSION_COUNT)
        self._opening[key] += 1
        try:
            yield
        finally:
            self._opening[key] -= 1
            if not self._opening[key]:
                del self._opening[key]

    # -- objects

    def check_create(self, conn: ClientConnection, token: VirtualToken, call_id: int,
                     args: list[Any]) -> None:
        """Before a creating call: CKR_DEVICE_MEMORY when what it would make exceeds the
        connection's session-object or the identity's token-object quota. An object
        whose kind the template leaves open (a copy) counts against both."""
        on_token = [attr_bool(args[p], ck.CKA_TOKEN) for p in CREATE_TEMPLATES[call_id]]
        made = len(NEW_OBJECTS[call_id])
        if len(on_token) < made:  # one template for several objects
            on_token += [on_token[-1] if on_token else None] * (made - len(on_token))
        session_new = sum(1 for v in on_token if not v)
        token_new = sum(1 for v in on_token if v or (v is None and call_id == _COPY))
        if session_new:
            mine = self._session_objects.get(conn.id, {})
            if len(mine) + session_new > self.cfg.max_session_objects_per_connection:
                self._prune_session_objects(conn)
                if len(mine) + session_new > self.cfg.max_session_objects_per_connection:
                    self._hit(conn, "max_session_objects_per_connection", ckr.DEVICE_MEMORY)
        if token_new:
            key = conn.identity.key
            owned = self.ownership.count_owned_by(key) + self._made_by[key]
            if owned + token_new > self.cfg.max_token_objects_per_identity:
                self._hit(conn, "max_token_objects_per_identity", ckr.DEVICE_MEMORY)

    def created(self, conn: ClientConnection, session: int, ref: ObjectRef,
                info: tuple[bool, int, bytes, bytes]) -> None:
        """After a creation: remember what counts against which quota. A token object
        of an owned namespace is counted from the registry's ownership records."""
        t = ref.token
        ns = conn.grants[t].namespace
        claimed = ns is not None and ns.owned
        if not info[0]:
            self._session_objects.setdefault(conn.id, {})[
                (id(t), ref.generation, ref.backend_handle)] = (t, session)
        elif not claimed:
            obj = (t.name, *info[1:])
            if obj not in self._made:
                self._made[obj] = conn.identity.key
                self._made_by[conn.identity.key] += 1

    def destroyed(self, conn: ClientConnection, ref: ObjectRef,
                  info: tuple[bool, int, bytes, bytes] | None) -> None:
        t = ref.token
        mine = self._session_objects.get(conn.id)
        if mine is not None:
            mine.pop((id(t), ref.generation, ref.backend_handle), None)
        if info is not None and info[0]:
            maker = self._made.pop((t.name, *info[1:]), None)
            if maker is not None:
                self._made_by[maker] -= 1
                if self._made_by[maker] <= 0:
                    del self._made_by[maker]

    def finalized(self, conn: ClientConnection) -> None:
        """C_Finalize or close: the connection's sessions, hence its session objects,
        are gone."""
        self._session_objects.pop(conn.id, None)

    def _prune_session_objects(self, conn: ClientConnection) -> None:
        """Session objects die with the session that made them and with their backend
        instance: forget those (only when the quota is reached)."""
        mine = self._session_objects.get(conn.id)
        if not mine:
            return
        for k, (t, sh) in list(mine.items()):
            s = conn.handles.sessions.get(sh)
            if k[1] != t.backend.generation or s is None or s.generation != k[1]:
                del mine[k]

    def _hit(self, conn: ClientConnection, limit: str, rv: int) -> None:
        limited_log.warning("limit reached", limit=limit, peer=conn.peer,
                            value=getattr(self.cfg, limit), rv=ckr.name(rv))
        raise Pkcs11Error(rv, f"{limit} reached")


#: the copy keeps the original's CKA_TOKEN unless the template says otherwise
_COPY = ID["C_CopyObject"]


def _prune_dead_sessions(conn: ClientConnection) -> None:
    """Sessions of a backend instance that died are gone: drop them from the handle
    table (as session_for does when one is used) before counting."""
    sessions = conn.handles.sessions
    for h in [h for h, s in sessions.items() if s.generation != s.token.backend.generation]:
        del sessions[h]

"""Back-pressure per connection (DESIGN decision 9); quotas are in quotas.py.

:class:`ConnectionFlow`: the gateway reads no more of a connection while it has
``max_calls_in_flight`` calls being served, or while its unsent replies plus what its
calls in flight hold exceed ``max_pending_reply_bytes``; it reads on when they are
answered and read. A request frame must arrive within ``frame_timeout`` of its first
byte. The bytes held by all connections of one identity share one budget.

Half-close (unix socket): a client that shuts its write side (``shutdown(SHUT_WR)``)
after its last request gets the replies to every request the gateway received whole,
then the connection is closed (:meth:`ConnectionFlow.end_of_input`). Calls it had not
sent whole (a partial frame) are dropped. It stays under the same bounds as any
connection (calls in flight, unsent reply bytes, the identity's budget), and it must
keep reading: once it has stopped taking replies for ``frame_timeout`` (the writer
paused and not resumed), the connection is aborted. EOF on a connection is final, so
reading is never resumed after it (libuv: reading again after EOF is undefined).

Unsent replies: the transport holds at most ``_TRANSPORT_HIGH`` bytes of them; the rest
wait in one bytearray of the connection's (:meth:`ConnectionFlow.write`). A transport
keeps one buffer object per write, which costs more than a small reply's bytes (about
10 MiB per 4 MiB of 32-byte replies): counted in bytes, a client that never reads held
far more memory than max_pending_reply_bytes, and its identity's budget saw nothing
until a transport's buffer passed max_pending_reply_bytes (one uid held 256 connections
just below it: some 2.5 GiB).

A limit that is hit gives the PKCS#11 code for it (or a closed connection) and a log
record, through :class:`LogLimiter` so that a flood does not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..codec import AttrRequest, FrameReader, ProtocolError
from ..config import ServerConfig
from .tables import ATTR_REQUEST_ARG, CAPACITY_ARGS

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.limits")

#: a reply's frame header and fixed fields, beyond the output buffers it carries
_REPLY_OVERHEAD = 64
#: what a call costs while in flight besides its buffers (task, decoded arguments,
#: reply future): measured 2.9 KiB for a call queued behind another on its session
_CALL_OVERHEAD = 3072
#: at max_calls_in_flight with none answered for this long, the calls in flight may be
#: waiting for requests not read yet (an operation's next step holds a pool session
#: another one waits for): read on, bounded by max_pending_reply_bytes alone
STALL_SECONDS = 0.5
#: a capacity of 0xFFFFFFFF asks only for the size (no buffer)
_SIZE_QUERY = 0xFFFFFFFF
#: unsent reply bytes a transport may hold (its pause_writing mark); what comes while
#: it is over goes to the connection's own buffer (see the module docstring)
_TRANSPORT_HIGH = 64 * 1024


class LogLimiter:
    """At most ``burst`` records per ``period`` seconds for each message and limit (and
    identity, when one is given as ``who``); the rest are counted and summarised in one
    record at the end of the window. Windows are kept for at most ``max_windows`` keys:
    beyond it the ended ones are summarised and dropped, and while it is still full a
    new identity shares one window per message with the other newcomers."""

    def __init__(self, logger: logging.Logger, burst: int = 20, period: float = 1.0,
                 max_windows: int = 4096) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self.max_windows = max_windows
        #: (message, limit, who) -> [window start, records in window, suppressed in
        #: window, level]
        self._windows: dict[tuple[str, Any, str | None], list[float]] = {}

    def warning(self, msg: str, **fields: Any) -> None:
        self.record(logging.WARNING, msg, **fields)

    def info(self, msg: str, **fields: Any) -> None:
        self.record(logging.INFO, msg, **fields)

    def record(self, level: int, msg: str, *, who: str | None = None,
               exc_info: BaseException | None = None, logger: logging.Logger | None = None,
               **fields: Any) -> None:
        """``logger``: another logger than the limiter's for this message (its summary
        goes to the limiter's)."""
        now = time.monotonic()
        key = (msg, fields.get("limit"), who)
        w = self._windows.get(key)
        if w is None and who is not None and len(self._windows) >= self.max_windows:
            self._sweep(now)
            if len(self._windows) >= self.max_windows:
                key = (msg, fields.get("limit"), "(others)")
                w = self._windows.get(key)
        if w is None or now - w[0] >= self.period:
            if w is not None:
                self._flush(key, level)
            w = self._windows[key] = [now, 0, 0, level]
        w[1] += 1
        if w[1] <= self.burst:
            (logger or self.logger).log(level, msg, extra=fields, exc_info=exc_info)
            return
        w[2] += 1
        if w[2] == 1:
            with contextlib.suppress(RuntimeError):  # no loop: summarised at the next one
                asyncio.get_running_loop().call_later(self.period, self._flush, key, level)

    def _sweep(self, now: float) -> None:
        """Summarise and drop the windows that have ended."""
        for key, w in list(self._windows.items()):
            if now - w[0] >= self.period:
                self._flush(key, int(w[3]))
                del self._windows[key]

    def flush_all(self) -> None:
        """Summarise now what every open window held back (at shutdown)."""
        for key, w in list(self._windows.items()):
            self._flush(key, int(w[3]))

    def _flush(self, key: tuple[str, Any, str | None], level: int) -> None:
        w = self._windows.get(key)
        if w is not None and w[2]:
            msg, limit, who = key
            extra: dict[str, Any] = {"count": int(w[2]), "seconds": self.period}
            if limit is not None or who is None:
                extra["limit"] = limit
            if who is not None:
                extra["identity"] = who
            self.logger.log(level, f"{msg} (more, not logged one by one)", extra=extra)
            w[2] = 0


limited_log = LogLimiter(log)
#: what a client's own requests make the gateway log (refused templates, policy
#: denials, locked PINs, bad frames): per identity, so that one client's flood neither
#: fills the disk nor hides another's records. The rate is REFUSAL_LOG_BURST records
#: per REFUSAL_LOG_PERIOD seconds for each message, then one summary with a count
REFUSAL_LOG_BURST = 50
REFUSAL_LOG_PERIOD = 60.0
refusal_log = LogLimiter(logging.getLogger("p11gate.conn"), burst=REFUSAL_LOG_BURST,
                         period=REFUSAL_LOG_PERIOD)


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
        #: replies written while the transport is over _TRANSPORT_HIGH: one buffer
        #: whose memory is its length (given to the transport when it drains)
        self._out = bytearray()
        self.reading_paused = False
        self._receiving = False
        self._timer: asyncio.TimerHandle | None = None
        #: the count bound is lifted (see STALL_SECONDS) until in flight is below it
        self._over_cap = False
        self._progress = 0.0
        self._stall: asyncio.TimerHandle | None = None
        #: the client shut its write side: answer what was received, then close
        self.eof = False
        #: after EOF: the writer resumed (the client read) since the last drain check
        self._drained = False
        self._drain: asyncio.TimerHandle | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # below max_pending_reply_bytes (at least 64 KiB): a connection blocked by
        # unsent replies alone always has its writer paused, so resume_writing comes
        high = min(_TRANSPORT_HIGH, self.cfg.max_pending_reply_bytes // 4)
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=high, low=high // 4)

    def write(self, frame: bytes) -> None:
        """Send a reply frame: to the transport, or while its buffer is over its mark,
        to this connection's own buffer (counted against the identity's budget)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if not self.writer_paused:
            t.write(frame)
            return
        self._out += frame
        if self.usage is not None:
            self._account()

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
        if self._held:  # (only a connection holding bytes pays for this)
            self._account()
        self._maybe_resume()
        if self.eof:
            self._maybe_done()

    def unsent(self) -> int:
        """Reply bytes not sent yet: the transport's and this connection's own."""
        t = self.transport
        return (t.get_write_buffer_size() if t is not None else 0) + len(self._out)

    def blocked(self) -> bool:
        if self.in_flight >= self.cfg.max_calls_in_flight and not self._over_cap:
            return True
        return self.promised + self.unsent() > self.cfg.max_pending_reply_bytes

    # -- transport hooks

    def pause_writing(self) -> None:
        self.writer_paused = True
        if self.blocked():
            self._pause()
        self._account()

    def resume_writing(self) -> None:
        self.writer_paused = False
        self._drained = True
        if self._out:
            # the transport keeps this object: a new one takes further replies; the
            # write may pause the writer again (pause_writing, re-entered)
            out, self._out = self._out, bytearray()
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(out)
        self._account()
        self._maybe_resume()
        self._maybe_done()

    def flush(self) -> None:
        """Hand the replies this connection holds to the transport, past its mark (a
        TLS connection that is being shut down: the transport sends what it has, then
        ends)."""
        t = self.transport
        if self._out and t is not None and not t.is_closing():
            out, self._out = self._out, bytearray()
            t.write(out)
            self._account()

    def _account(self) -> None:
        """Update this connection's part of its identity's buffered bytes; close it
        when that takes the identity beyond max_buffered_bytes_per_identity (many
        stalled frames or unread replies at once are an attack, not a workload)."""
        u = self.usage
        if u is None:
            return
        held = self.reader.pending()
        if self.writer_paused:  # (else the transport holds at most _TRANSPORT_HIGH)
            held += self.unsent()
        if self._over_cap:
            # past the count bound only bytes bound the calls in flight, some thousands
            # per connection: the identity's connections share that too (before, one
            # uid's 256 connections held some 7 MiB each in calls nobody counted)
            held += self.promised
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
                if self._over_cap:
                    # bytes alone bound this loop now (some thousand calls): the
                    # identity's budget is checked at each, not after them all
                    self._account()
                    if self.transport is None or self.transport.is_closing():
                        break
        finally:
            frames.close()
            self._receiving = False
        if self._held or self._over_cap or self.reader.pending() > 65536:
            self._account()  # cheap enough for every chunk of a big frame
        if self.blocked():
            self._pause()
        elif self.eof:
            self._maybe_done()
        else:
            self._deadline(done)

    def _pause(self) -> None:
        if self.reading_paused or self.transport is None:
            return
        self.reading_paused = True
        self._cancel_timer()  # what is not read yet cannot be late
        if not self.transport.is_closing() and not self.eof:
            self.transport.pause_reading()
        # ordinary flow control for a client that pipelines a lot: info, not a warning
        if self.in_flight >= self.cfg.max_calls_in_flight and not self._over_cap:
            limited_log.info("connection paused: calls in flight at the limit",
                             conn=self.conn_id, limit="max_calls_in_flight")
            self._watch_stall()
        else:
            limited_log.info("connection paused: replies not read by the client",
                             conn=self.conn_id, limit="max_pending_reply_bytes",
                             unsent=self.unsent(), promised=self.promised)

    def _maybe_resume(self) -> None:
        if not self.reading_paused or self._receiving or self.blocked():
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        self.reading_paused = False
        if not self.eof:  # (after EOF the socket is never read again)
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
        self._account()
        limited_log.info("connection resumed over max_calls_in_flight: none answered for "
                         f"{STALL_SECONDS} s (they may wait for requests not read yet)",
                         conn=self.conn_id, limit="max_calls_in_flight",
                         in_flight=self.in_flight)
        self._maybe_resume()

    # -- half-close

    def end_of_input(self) -> None:
        """The client shut its write side: the frames received whole are answered (as
        the bounds allow), a partial one is dropped, and once every reply is handed to
        the transport the connection is closed (the transport sends what it holds
        first). A client that stops reading meanwhile is aborted (see the module
        docstring)."""
        self.eof = True
        self._cancel_timer()  # a partial frame cannot complete now: nothing to wait for
        self._drained = False
        self._watch_drain()
        if self.reading_paused:
            self._maybe_resume()
        elif not self._receiving:
            try:
                self.receive(b"")
            except ProtocolError as e:
                self._abort(f"protocol error: {e}")
        self._maybe_done()

    def _maybe_done(self) -> None:
        if (not self.eof or self._receiving or self.in_flight or self._out
                or self.reader.has_frame()):
            return
        t = self.transport
        if t is not None and not t.is_closing():
            self.reader.clear()  # a partial frame's bytes: no longer counted either
            self._account()
            t.close()  # after what the transport holds is sent: then connection_lost

    def _watch_drain(self) -> None:
        self._drain = asyncio.get_running_loop().call_later(self.cfg.frame_timeout,
                                                            self._drain_check)

    def _drain_check(self) -> None:
        self._drain = None
        t = self.transport
        if t is None:
            return
        if self.writer_paused and not self._drained:
            limited_log.warning("closing client connection: it shut its side and does not "
                                "read its replies", conn=self.conn_id,
                                limit="frame_timeout", seconds=self.cfg.frame_timeout,
                                unsent=self.unsent())
            t.abort()
            return
        self._drained = False
        self._watch_drain()

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
        self._out = bytearray()  # never sent now
        # nor read: the connection may outlive its socket for a while (its cleanup
        # waits for its calls still at the backend), and a read chunk is up to 256 KiB
        self.reader.clear()
        self._cancel_timer()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        self.release()

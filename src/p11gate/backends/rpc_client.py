"""Client side of the p11-kit RPC protocol over any asyncio stream transport.

Used to talk to `p11gate worker` processes, to `p11-kit remote` (a drop-in worker) and
to remote RPC endpoints. Several requests may be in flight; replies are matched by call
code, so a worker that answers out of order is fine.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any, cast

from ..codec import (
    CALLS,
    HANDSHAKE,
    MAX_VERSION,
    CodecError,
    FrameReader,
    Null,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    dialect_for_version,
    encode_request,
)
from ..codec.calls import C_DeriveKey, C_DeriveKey2, C_Initialize, C_InitToken, C_InitToken2
from ..codec.chains import CHAIN_OPTIONS, decode_chain, encode_chain
from ..codec.message import is_reply_to
from ..codec.tables import Dialect
from ..codec.values import ParamUpdate
from ..errors import BackendUnavailable, Pkcs11Error
from .futures import passed_on

OPTIONS = b"p11gate"
_NEVER = float("inf")
#: a call in flight: future, call id, deadline (loop time; None: none), on_timeout,
#: whether the reply's header is checked (relayed replies)
_Pending = tuple[asyncio.Future[bytes], int, float | None, Callable[[], None] | None, bool]


class RpcClientProtocol(asyncio.Protocol):
    """Speaks the client half of the protocol: version byte, then request frames."""

    def __init__(self, max_frame: int = 1 << 30) -> None:
        self.transport: asyncio.Transport | None = None
        self.dialect: Dialect | None = None
        #: kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11
        self._loop = loop = asyncio.get_running_loop()
        self._version_fut: asyncio.Future[int] = loop.create_future()
        #: code → the call in flight: (future, call id, deadline (loop time) or None,
        #: on_timeout, check the reply's header)
        self._pending: dict[int, _Pending] = {}
        #: one timer for the deadlines of all calls in flight, armed at the earliest
        #: (not one timer per call: a reply costs no timer cancel, a call no timer)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._codes = itertools.count(0x10)
        self._reader = FrameReader(max_frame)
        self._got_version = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_reason = ""
        #: called once, synchronously, when the connection fails, before any pending
        #: call is failed: the owner marks itself down first, so a client that reacts to
        #: the error at once already finds the backend restarting
        self.on_lost: Callable[[str], None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write()
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(bytes([MAX_VERSION]))

    def data_received(self, data: bytes) -> None:
        if not self._got_version:
            self._got_version = True
            if not self._version_fut.done():
                self._version_fut.set_result(data[0])
            data = data[1:]
            if not data:
                return
        try:
            pending = self._pending
            for frame in self._reader.feed(data):
                entry = pending.pop(frame.code, None)
                if entry is None:
                    continue
                fut = entry[0]
                if fut.done():
                    continue
                if entry[4] and not is_reply_to(frame.body, entry[1]):
                    fut.set_exception(Pkcs11Error(ckr.DEVICE_ERROR, "bad reply"))
                else:
                    fut.set_result(frame.body)
        except CodecError as e:
            self._fail(f"bad frame from peer: {e}")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost{': ' + str(exc) if exc else ''}")

    def _fail(self, reason: str) -> None:
        first = not self.close_reason
        self.close_reason = self.close_reason or reason
        if first and self.on_lost is not None:
            self.on_lost(reason)
        if not self._version_fut.done():
            self._version_fut.set_exception(BackendUnavailable(reason))
        pending, self._pending = self._pending, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, _NEVER
        for fut, *_ in pending.values():
            if not fut.done():
                fut.set_exception(BackendUnavailable(reason))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- API
    async def handshake(self, timeout: float) -> Dialect:
        version = await asyncio.wait_for(self._version_fut, timeout)
        self.dialect = dialect_for_version(version)
        return self.dialect

    def send(self, call_id: int, args: list[Any], timeout: float | None = None,
             on_timeout: Callable[[], None] | None = None,
             check: bool = False) -> asyncio.Future[bytes]:
        """Send one request; the future resolves to the reply body. With ``timeout``
        (seconds), a reply not in by then fails it with TimeoutError, after
        ``on_timeout`` is called; with ``check``, a reply whose header is not this
        call's fails it with CKR_DEVICE_ERROR."""
        if self.transport is None or self.transport.is_closing() or self.closed.done():
            raise BackendUnavailable(self.close_reason or "not connected")
        assert self.dialect is not None
        return self._send_frame(encode_request(call_id, args, self.dialect), call_id,
                                timeout, on_timeout, check)

    def send_body(self, body: bytes, call_id: int, timeout: float | None = None,
                  on_timeout: Callable[[], None] | None = None,
                  check: bool = False) -> asyncio.Future[bytes]:
        """Send an already encoded request ``body`` (for ``call_id``) as it is."""
        if self.transport is None or self.transport.is_closing() or self.closed.done():
            raise BackendUnavailable(self.close_reason or "not connected")
        return self._send_frame(body, call_id, timeout, on_timeout, check)

    def send_chain(self, calls: list[tuple[int, list[Any]]], timeout: float | None = None,
                   on_timeout: Callable[[], None] | None = None) -> asyncio.Future[bytes]:
        """Send ``calls`` as one chain (codec.chains: only to a ``p11gate worker``); the
        future resolves to the chain reply's body."""
        if self.transport is None or self.transport.is_closing() or self.closed.done():
            raise BackendUnavailable(self.close_reason or "not connected")
        assert self.dialect is not None
        body = encode_chain([encode_request(cid, a, self.dialect) for cid, a in calls])
        return self._send_frame(body, calls[0][0], timeout, on_timeout, False, CHAIN_OPTIONS)

    def _send_frame(self, body: bytes, call_id: int, timeout: float | None,
                    on_timeout: Callable[[], None] | None,
                    check: bool, options: bytes = OPTIONS) -> asyncio.Future[bytes]:
        assert self.transport is not None
        code = next(self._codes) & 0xFFFFFFFF or next(self._codes)
        loop = self._loop
        fut: asyncio.Future[bytes] = loop.create_future()
        at = None
        if timeout is not None:
            at = loop.time() + timeout
            if at < self._timer_at:
                self._arm(at)
        self._pending[code] = (fut, call_id, at, on_timeout, check)
        self.transport.write(build_frame(code, body, options))
        return fut

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire_due)

    def _expire_due(self) -> None:
        """The earliest deadline has come: fail every call past its deadline (each
        after its on_timeout), re-arm for the earliest left. Calls answered since were
        taken out of ``_pending``, so a call answered in time costs nothing here."""
        self._timer, self._timer_at = None, _NEVER
        now = self._loop.time()
        due = [(code, e) for code, e in self._pending.items() if e[2] is not None and e[2] <= now]
        for code, _ in due:
            del self._pending[code]
        for _, (fut, _, _, on_timeout, _) in due:
            if fut.done():
                continue
            if on_timeout is not None:
                on_timeout()
            if not fut.done():
                fut.set_exception(TimeoutError())
        left = [e[2] for e in self._pending.values() if e[2] is not None]
        if left and not self.close_reason:
            self._arm(min(left))

    def abandon(self, fut: asyncio.Future[bytes]) -> None:
        for code, (f, *_) in list(self._pending.items()):
            if f is fut:
                del self._pending[code]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RpcChannel:
    """One established connection to an RPC server, with call translation for peers that
    lack newer call ids (a 0.24 `p11-kit remote` has no C_InitToken2/C_DeriveKey2)."""

    def __init__(self, proto: RpcClientProtocol, timeout: float) -> None:
        self.proto = proto
        self.timeout = timeout

    @property
    def dialect(self) -> Dialect:
        assert self.proto.dialect is not None
        return self.proto.dialect

    async def initialize(self, init_reserved: str | None) -> None:
        reserved = (init_reserved or "").encode() + b"\0"
        await self.call(C_Initialize, [HANDSHAKE, 1 if init_reserved else 0, reserved])

    async def call(self, call_id: int, args: list[Any], timeout: float | None = None) -> list[Any]:
        return await self.submit(call_id, args, timeout)

    def submit(
        self,
        call_id: int,
        args: list[Any],
        timeout: float | None = None,
        on_timeout: Callable[[], None] | None = None,
    ) -> asyncio.Future[list[Any]]:
        """Send one request now; the future resolves to the decoded reply values.

        Callback based (no task per call). A missed deadline fails the future with
        TimeoutError and calls ``on_timeout``.
        """
        d = self.dialect
        if call_id > d.max_call_id:
            return asyncio.ensure_future(self._downgrade(call_id, args, timeout))
        if d.version == 0:
            args = _old_server_safe(call_id, args)
        raw = self.proto.send(call_id, args,
                              timeout if timeout is not None else self.timeout, on_timeout)
        out: asyncio.Future[list[Any]] = self.proto._loop.create_future()

        def done(f: asyncio.Future[bytes]) -> None:
            if passed_on(f, out):
                return
            try:
                out.set_result(decode_reply(f.result(), d, call_id, args))
            except ReplyError as e:
                out.set_exception(Pkcs11Error(e.rv))
            except CodecError as e:
                out.set_exception(Pkcs11Error(ckr.DEVICE_ERROR, f"bad reply: {e}"))

        raw.add_done_callback(done)
        return out

    def submit_raw(
        self, call_id: int, args: list[Any], on_timeout: Callable[[], None] | None = None
    ) -> asyncio.Future[bytes]:
        """Like :meth:`submit`, but the future resolves to the reply *body*, checked only
        for its header: for relaying replies that need no translation."""
        return self.proto.send(call_id, args, self.timeout, on_timeout, check=True)

    def submit_body(
        self, call_id: int, body: bytes, on_timeout: Callable[[], None] | None = None
    ) -> asyncio.Future[bytes]:
        """Like :meth:`submit_raw`, for a request already encoded in this channel's
        dialect: relayed byte for byte, with no decoding and re-encoding in between
        (the caller has checked it, and patched any handles in place). Calls the peer
        lacks (see :meth:`submit`) must not come this way."""
        if call_id > self.dialect.max_call_id or not body.startswith(call_id.to_bytes(4, "big")):
            raise ValueError(f"not a request body for call {call_id} in this dialect")
        return self.proto.send_body(body, call_id, self.timeout, on_timeout, check=True)

    def submit_chain(
        self, calls: list[tuple[int, list[Any]]], timeout: float | None = None,
        on_timeout: Callable[[], None] | None = None,
    ) -> asyncio.Future[list[list[Any] | Pkcs11Error]]:
        """Send ``calls`` as one chain to a ``p11gate worker`` (codec.chains); the future
        resolves to each call's reply values in order, or its Pkcs11Error, which is then
        the last item (the worker runs nothing after a failed call). Only calls every
        dialect knows: no downgrades here."""
        d = self.dialect
        if any(cid > d.max_call_id for cid, _ in calls):
            raise ValueError("a chained call this peer lacks")
        raw = self.proto.send_chain(calls, timeout if timeout is not None else self.timeout,
                                    on_timeout)
        out: asyncio.Future[list[list[Any] | Pkcs11Error]] = self.proto._loop.create_future()

        def done(f: asyncio.Future[bytes]) -> None:
            if passed_on(f, out):
                return
            try:
                out.set_result(decode_chain_reply(f.result(), d, calls))
            except CodecError as e:
                out.set_exception(Pkcs11Error(ckr.DEVICE_ERROR, f"bad chain reply: {e}"))

        raw.add_done_callback(done)
        return out

    async def _downgrade(self, call_id: int, args: list[Any], timeout: float | None) -> list[Any]:
        if call_id == C_InitToken2:
            slot, pin, label = args
            return await self.call(C_InitToken, [slot, pin, label.rstrip(b" ")], timeout)
        if call_id == C_DeriveKey2:
            (handle,) = await self.call(C_DeriveKey, args, timeout)
            return [ckr.OK, ParamUpdate(True), handle]
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED)


def decode_chain_reply(body: bytes, d: Dialect,
                       calls: list[tuple[int, list[Any]]]) -> list[list[Any] | Pkcs11Error]:
    """The values (or error) of each reply in a chain reply; CodecError when it is not
    one for these calls."""
    bodies = decode_chain(body)
    if len(bodies) > len(calls):
        raise CodecError("more replies than requests in a chain")
    out: list[list[Any] | Pkcs11Error] = []
    for i, ((cid, args), rep) in enumerate(zip(calls, bodies, strict=False)):
        try:
            out.append(decode_reply(rep, d, cid, args))
        except ReplyError as e:
            out.append(Pkcs11Error(e.rv))
            if i != len(bodies) - 1:
                raise CodecError("a chain went on after an error") from None
            return out
    if len(out) < len(calls):
        raise CodecError("a chain stopped without an error")
    return out


def _old_server_safe(call_id: int, args: list[Any]) -> list[Any]:
    """A 0.24 server misreads an absent ``ay`` followed by more arguments (SPEC §3.4):
    send a present, empty array instead."""
    out = None
    codes = CALLS[call_id].req_codes
    for i, v in enumerate(args[:-1]):
        if codes[i] == "ay" and (v is None or (isinstance(v, Null) and v.length == 0)):
            out = out or list(args)
            out[i] = b""
    return out or args

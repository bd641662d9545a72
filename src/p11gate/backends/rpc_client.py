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
from ..codec.message import is_reply_to
from ..codec.tables import Dialect
from ..codec.values import ParamUpdate
from ..errors import BackendUnavailable, Pkcs11Error

OPTIONS = b"p11gate"


class RpcClientProtocol(asyncio.Protocol):
    """Speaks the client half of the protocol: version byte, then request frames."""

    def __init__(self, max_frame: int = 1 << 30) -> None:
        self.transport: asyncio.Transport | None = None
        self.dialect: Dialect | None = None
        self._version_fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        self._codes = itertools.count(0x10)
        self._reader = FrameReader(max_frame)
        self._got_version = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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
            for frame in self._reader.feed(data):
                entry = self._pending.pop(frame.code, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(frame.body)
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
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(BackendUnavailable(reason))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- API
    async def handshake(self, timeout: float) -> Dialect:
        version = await asyncio.wait_for(self._version_fut, timeout)
        self.dialect = dialect_for_version(version)
        return self.dialect

    def send(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes]:
        if self.transport is None or self.transport.is_closing() or self.closed.done():
            raise BackendUnavailable(self.close_reason or "not connected")
        assert self.dialect is not None
        return self._send_frame(encode_request(call_id, args, self.dialect), call_id)

    def send_body(self, body: bytes, call_id: int) -> asyncio.Future[bytes]:
        """Send an already encoded request ``body`` (for ``call_id``) as it is."""
        if self.transport is None or self.transport.is_closing() or self.closed.done():
            raise BackendUnavailable(self.close_reason or "not connected")
        return self._send_frame(body, call_id)

    def _send_frame(self, body: bytes, call_id: int) -> asyncio.Future[bytes]:
        assert self.transport is not None
        code = next(self._codes) & 0xFFFFFFFF or next(self._codes)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[code] = (fut, call_id)
        self.transport.write(build_frame(code, body, OPTIONS))
        return fut

    def abandon(self, fut: asyncio.Future[bytes]) -> None:
        for code, (f, _) in list(self._pending.items()):
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
        raw = self.proto.send(call_id, args)
        loop = asyncio.get_running_loop()
        out: asyncio.Future[list[Any]] = loop.create_future()
        timer = loop.call_later(
            timeout if timeout is not None else self.timeout, _expire, raw
        )

        def done(f: asyncio.Future[bytes]) -> None:
            timer.cancel()
            if out.done():
                return
            exc = f.exception()
            if exc is not None:
                if isinstance(exc, TimeoutError):
                    self.proto.abandon(f)
                    if on_timeout is not None:
                        on_timeout()
                out.set_exception(exc)
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
        return self._relay(call_id, self.proto.send(call_id, args), on_timeout)

    def submit_body(
        self, call_id: int, body: bytes, on_timeout: Callable[[], None] | None = None
    ) -> asyncio.Future[bytes]:
        """Like :meth:`submit_raw`, for a request already encoded in this channel's
        dialect: relayed byte for byte, with no decoding and re-encoding in between
        (the caller has checked it, and patched any handles in place). Calls the peer
        lacks (see :meth:`submit`) must not come this way."""
        if call_id > self.dialect.max_call_id or not body.startswith(call_id.to_bytes(4, "big")):
            raise ValueError(f"not a request body for call {call_id} in this dialect")
        return self._relay(call_id, self.proto.send_body(body, call_id), on_timeout)

    def _relay(
        self, call_id: int, raw: asyncio.Future[bytes], on_timeout: Callable[[], None] | None
    ) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        out: asyncio.Future[bytes] = loop.create_future()
        timer = loop.call_later(self.timeout, _expire, raw)

        def done(f: asyncio.Future[bytes]) -> None:
            timer.cancel()
            if out.done():
                return
            exc = f.exception()
            if exc is not None:
                if isinstance(exc, TimeoutError):
                    self.proto.abandon(f)
                    if on_timeout is not None:
                        on_timeout()
                out.set_exception(exc)
                return
            body = f.result()
            if is_reply_to(body, call_id):
                out.set_result(body)
            else:
                out.set_exception(Pkcs11Error(ckr.DEVICE_ERROR, "bad reply"))

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


def _expire(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


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

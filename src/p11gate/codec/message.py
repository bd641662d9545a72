"""RPC message bodies (SPEC §3): call id, signature, arguments. Pure: bytes ↔ values.

Each signature code has one reader and one writer; a call's signature is compiled once
into a tuple of them, so encoding and decoding are table lookups, not parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from . import ckr
from .attributes import read_attr_requests, read_attributes, write_attr_requests, write_attributes
from .buffer import NULL_ARRAY, Reader, Writer
from .calls import CALLS, C_DeriveKey2, C_GetAttributeValue, C_SignMessageNext, Call
from .errors import ArgumentError, ProtocolError
from .mechanisms import read_mechanism, read_param_update, write_mechanism, write_param_update
from .tables import Dialect
from .values import Null, Version

_ERROR_BODY_PREFIX = b"\x00\x00\x00\x00\x00\x00\x00\x01u"


class _Ctx:
    """Per-message state some codes need: which ``s`` field we are at, and context
    from the matching request (fA sizes, mechanism type)."""

    __slots__ = ("mech_type", "s_index", "s_sizes", "size_queries")

    def __init__(
        self,
        s_sizes: tuple[int, ...],
        size_queries: list[bool] | None = None,
        mech_type: int = 0,
    ) -> None:
        self.s_sizes = s_sizes
        self.s_index = 0
        self.size_queries = size_queries
        self.mech_type = mech_type


# ---------------------------------------------------------------- readers


def _r_byte(r: Reader, d: Dialect, c: _Ctx) -> int:
    return r.byte()


def _r_ulong(r: Reader, d: Dialect, c: _Ctx) -> int:
    return r.u64()


def _r_version(r: Reader, d: Dialect, c: _Ctx) -> Version:
    return Version(r.byte(), r.byte())


def _r_space_string(r: Reader, d: Dialect, c: _Ctx) -> bytes:
    v = r.array()
    size = c.s_sizes[c.s_index] if c.s_index < len(c.s_sizes) else -1
    c.s_index += 1
    if v is None or len(v) != size:
        raise ArgumentError(ckr.DEVICE_ERROR, f"fixed string must be {size} bytes")
    return v


def _r_zstring(r: Reader, d: Dialect, c: _Ctx) -> bytes:
    v = r.array()
    return b"" if v is None else v


def _r_byte_buffer(r: Reader, d: Dialect, c: _Ctx) -> bytes | Null | None:
    if r.byte():
        return r.array()
    return Null(r.u32())


def _r_ulong_buffer(r: Reader, d: Dialect, c: _Ctx) -> list[int] | Null | None:
    present = r.byte()
    n = r.u32()
    if not present:
        return Null(n)
    if n == NULL_ARRAY:
        return None
    if n * 8 > r.remaining():
        raise ProtocolError("ulong array count out of range")
    return [r.u64() for _ in range(n)]


def _r_capacity(r: Reader, d: Dialect, c: _Ctx) -> int:
    return r.u32()


def _r_attrs(r: Reader, d: Dialect, c: _Ctx) -> Any:
    return read_attributes(r, d, 0, c.size_queries)


def _r_attr_requests(r: Reader, d: Dialect, c: _Ctx) -> Any:
    return read_attr_requests(r, d)


def _r_mechanism(r: Reader, d: Dialect, c: _Ctx) -> Any:
    return read_mechanism(r, d)


def _r_param_update(r: Reader, d: Dialect, c: _Ctx) -> Any:
    return read_param_update(r, c.mech_type, d)


_READERS: dict[str, Callable[[Reader, Dialect, _Ctx], Any]] = {
    "y": _r_byte,
    "u": _r_ulong,
    "v": _r_version,
    "s": _r_space_string,
    "z": _r_zstring,
    "ay": _r_byte_buffer,
    "au": _r_ulong_buffer,
    "fy": _r_capacity,
    "fu": _r_capacity,
    "aA": _r_attrs,
    "fA": _r_attr_requests,
    "M": _r_mechanism,
    "P": _r_param_update,
}

# ---------------------------------------------------------------- writers


def _w_byte(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    w.byte(v)


def _w_ulong(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    w.u64(v)


def _w_version(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    w.byte(v[0])
    w.byte(v[1])


def _w_space_string(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    size = c.s_sizes[c.s_index] if c.s_index < len(c.s_sizes) else len(v)
    c.s_index += 1
    if len(v) != size:
        raise ValueError(f"fixed string must be {size} bytes")
    w.array(v)


def _w_zstring(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    w.array(v)


def _w_byte_buffer(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    if isinstance(v, Null):
        w.byte(0)
        w.u32(v.length)
    else:
        w.byte(1)
        w.array(v)


def _w_ulong_buffer(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    if isinstance(v, Null):
        w.byte(0)
        w.u32(v.length)
    elif v is None:
        w.byte(1)
        w.u32(NULL_ARRAY)
    else:
        w.byte(1)
        w.u32(len(v))
        for x in v:
            w.u64(x)


def _w_capacity(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    w.u32(v)


def _w_attrs(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    write_attributes(w, v, d)


def _w_attr_requests(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    write_attr_requests(w, v, d)


def _w_mechanism(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    write_mechanism(w, v, d)


def _w_param_update(w: Writer, v: Any, d: Dialect, c: _Ctx) -> None:
    write_param_update(w, v, c.mech_type, d)


_WRITERS: dict[str, Callable[[Writer, Any, Dialect, _Ctx], None]] = {
    "y": _w_byte,
    "u": _w_ulong,
    "v": _w_version,
    "s": _w_space_string,
    "z": _w_zstring,
    "ay": _w_byte_buffer,
    "au": _w_ulong_buffer,
    "fy": _w_capacity,
    "fu": _w_capacity,
    "aA": _w_attrs,
    "fA": _w_attr_requests,
    "M": _w_mechanism,
    "P": _w_param_update,
}

_Readers = tuple[Callable[[Reader, Dialect, _Ctx], Any], ...]
_Writers = tuple[Callable[[Writer, Any, Dialect, _Ctx], None], ...]
_REQ_READERS: list[_Readers] = [tuple(_READERS[c] for c in call.req_codes) for call in CALLS]
_REP_READERS: list[_Readers] = [tuple(_READERS[c] for c in call.rep_codes) for call in CALLS]
_REQ_WRITERS: list[_Writers] = [tuple(_WRITERS[c] for c in call.req_codes) for call in CALLS]
_REP_WRITERS: list[_Writers] = [tuple(_WRITERS[c] for c in call.rep_codes) for call in CALLS]


def _head(call_id: int, sig: bytes) -> bytes:
    return call_id.to_bytes(4, "big") + len(sig).to_bytes(4, "big") + sig


_HEADERS_REQ = [_head(c.id, c.req_sig) for c in CALLS]
_HEADERS_REP = [_head(c.id, c.rep_sig) for c in CALLS]
#: the headers the decoders compare in one go (tests point these elsewhere to run the
#: general path, which reads the header field by field and says what is wrong)
_QUICK_REQ = _HEADERS_REQ
_QUICK_REP = _HEADERS_REP


#: struct codes of the arguments that are fixed-width numbers on the wire
_FIXED_CODES = {"y": "B", "u": "Q", "fy": "I", "fu": "I"}


def _fixed(call: Call, codes: tuple[str, ...], head: bytes) -> tuple[bytes, struct.Struct] | None:
    """For a message made only of fixed-width numbers (C_GenerateRandom's request,
    C_OpenSession's reply, …): its header and one struct for all its values, so that
    decoding or encoding it is one comparison and one (un)pack, not a call per value."""
    if call.id == 0 or call.id == C_SignMessageNext or not codes:
        return None
    if not all(c in _FIXED_CODES for c in codes):
        return None
    return head, struct.Struct(">" + "".join(_FIXED_CODES[c] for c in codes))


_FIXED_REQ = [_fixed(c, c.req_codes, _HEADERS_REQ[c.id]) for c in CALLS]
_FIXED_REP = [_fixed(c, c.rep_codes, _HEADERS_REP[c.id]) for c in CALLS]


def _read_head(r: Reader, expect_reply: bool) -> tuple[Call, bytes]:
    cid = r.u32()
    sig = r.array()
    if sig is None:
        raise ProtocolError("missing signature")
    if cid >= len(CALLS) or (cid == 0 and not expect_reply):
        # a small id is named; a large one is four bytes of anything (a PIN's, after a
        # desync) and is not
        raise ProtocolError(f"unknown call id {cid}" if cid < 0x100 else "unknown call id")
    return CALLS[cid], sig


#: the letters p11-kit signatures are written in
_SIGNATURE_LETTERS = frozenset(b"AMPafsuvyz")


def _shown_signature(sig: bytes) -> str:
    """A wrong signature as a log may show it: what the client sent when it reads as
    one (a few signature letters: a client of another protocol version), else only its
    length. The bytes are the client's stream, wherever the client put them: a PIN
    that a desynchronised or hostile frame puts there never reaches the log."""
    if len(sig) <= 16 and set(sig) <= _SIGNATURE_LETTERS:
        return repr(sig)
    return f"of {len(sig)} bytes"


def decode_request(body: bytes | bytearray | memoryview, d: Dialect) -> tuple[Call, list[Any]]:
    """Decode a request body. ProtocolError → close; ArgumentError → ERROR reply."""
    if len(body) >= 4:
        cid = int.from_bytes(body[:4], "big")
        fixed = _FIXED_REQ[cid] if cid < len(_FIXED_REQ) else None
        if fixed is not None:
            head, layout = fixed
            hlen = len(head)
            # the same checks as below (call id, signature), and the same tolerance of
            # trailing bytes; anything else takes the general path and its errors
            if body[:hlen] == head and len(body) >= hlen + layout.size:
                return CALLS[cid], list(layout.unpack_from(body, hlen))
        elif 0 < cid < len(CALLS):
            # the expected header (call id, signature) compared in one go; a mismatch
            # takes the general path below, which says what is wrong
            head = _QUICK_REQ[cid]
            if body[:len(head)] == head:
                call = CALLS[cid]
                r = Reader(body, len(head))
                return call, _read_request_args(call, r, d)
    r = Reader(body)
    call, sig = _read_head(r, False)
    if sig != call.req_sig:
        raise ProtocolError(f"{call.name}: signature {_shown_signature(sig)} != "
                            f"{call.req_sig!r}")
    return call, _read_request_args(call, r, d)


def _read_request_args(call: Call, r: Reader, d: Dialect) -> list[Any]:
    ctx = _Ctx(call.req_s_sizes)
    if call.id == C_SignMessageNext:
        return _read_sign_message_next(r, d, ctx)
    return [f(r, d, ctx) for f in _REQ_READERS[call.id]]


def _read_sign_message_next(r: Reader, d: Dialect, ctx: _Ctx) -> list[Any]:
    """``uayayyfy``: p11-kit writes the ``y`` (signature-length pointer given, i.e. final
    part) and the ``fy`` capacity only when that flag is set. A ``y`` of 0 followed by a
    capacity anyway (older p11gate) is accepted too; absent, the capacity reads as 0."""
    session = r.u64()
    param = _r_byte_buffer(r, d, ctx)
    data = _r_byte_buffer(r, d, ctx)
    want = r.byte()
    cap = r.u32() if want or r.remaining() >= 4 else 0
    return [session, param, data, want, cap]


def encode_request(call_id: int, args: Sequence[Any], d: Dialect) -> bytes:
    fixed = _FIXED_REQ[call_id]
    if fixed is not None:
        try:
            return fixed[0] + fixed[1].pack(*args)
        except struct.error:  # out of range, not a number, wrong count: the general path
            pass
    call = CALLS[call_id]
    w = Writer()
    w.raw(_HEADERS_REQ[call_id])
    ctx = _Ctx(call.req_s_sizes)
    writers = _REQ_WRITERS[call_id]
    if len(args) != len(writers):
        raise ValueError(f"{call.name} takes {len(writers)} arguments, not {len(args)}")
    if call_id == C_SignMessageNext and not args[3]:
        writers = writers[:4]  # no signature-length pointer: p11-kit omits the fy
        args = args[:4]
    for f, v in zip(writers, args, strict=True):
        f(w, v, d, ctx)
    return bytes(w.buf)


def decode_reply(
    body: bytes | bytearray | memoryview,
    d: Dialect,
    expect_call: int,
    request_args: Sequence[Any] | None = None,
) -> list[Any]:
    """Decode a reply to ``expect_call``. An ERROR reply raises :class:`ReplyError`."""
    head = _QUICK_REP[expect_call] if 0 < expect_call < len(CALLS) else None
    if head is not None and body[:len(head)] == head:  # the expected header, in one go
        call = CALLS[expect_call]
        r = Reader(body, len(head))
    else:
        r = Reader(body)
        call, sig = _read_head(r, True)
        if call.id == 0:
            if sig != b"u":
                raise ProtocolError("ERROR reply with a bad signature")
            rv = r.u64()
            raise ReplyError(rv if rv else ckr.DEVICE_ERROR)
        if call.id != expect_call:
            raise ProtocolError(f"reply for {call.name}, expected {CALLS[expect_call].name}")
        if sig != call.rep_sig:
            raise ProtocolError(f"{call.name}: reply signature {_shown_signature(sig)} != "
                            f"{call.rep_sig!r}")
    ctx = _reply_ctx(call, request_args)
    readers = _REP_READERS[call.id]
    if call.id == C_DeriveKey2:
        rv = r.u64()
        pu = read_param_update(r, ctx.mech_type, d)
        return [rv, pu, r.u64()] if rv == ckr.OK else [rv, pu]
    return [f(r, d, ctx) for f in readers]


def encode_reply(
    call_id: int,
    values: Sequence[Any],
    d: Dialect,
    request_args: Sequence[Any] | None = None,
) -> bytes:
    fixed = _FIXED_REP[call_id]
    if fixed is not None:
        try:
            return fixed[0] + fixed[1].pack(*values)
        except struct.error:  # out of range, not a number, wrong count: the general path
            pass
    call = CALLS[call_id]
    w = Writer()
    w.raw(_HEADERS_REP[call_id])
    ctx = _reply_ctx(call, request_args)
    writers = _REP_WRITERS[call_id]
    if call_id == C_DeriveKey2 and len(values) == 2:
        writers = writers[:2]  # CKR_BUFFER_TOO_SMALL: the frame ends after P
    if len(values) != len(writers):
        raise ValueError(f"{call.name} returns {len(writers)} values, not {len(values)}")
    for f, v in zip(writers, values, strict=True):
        f(w, v, d, ctx)
    return bytes(w.buf)


def is_reply_to(body: bytes, call_id: int) -> bool:
    """Cheap check that ``body`` is a well-formed reply header for ``call_id`` or an ERROR
    reply: used when a reply is relayed without being decoded."""
    if body.startswith(_HEADERS_REP[call_id]):
        return True
    return len(body) == 17 and body.startswith(_ERROR_BODY_PREFIX)


def reply_rv(body: bytes) -> int:
    """The CK_RV of an encoded reply body: its value for an ERROR reply, else CKR_OK."""
    if body.startswith(_ERROR_BODY_PREFIX) and len(body) >= len(_ERROR_BODY_PREFIX) + 8:
        return int.from_bytes(body[len(_ERROR_BODY_PREFIX):len(_ERROR_BODY_PREFIX) + 8], "big")
    return 0


def encode_error(rv: int) -> bytes:
    """ERROR reply: call id 0, signature "u", the CK_RV truncated to 32 bits (§6.1)."""
    return _ERROR_BODY_PREFIX + (rv & 0xFFFFFFFF).to_bytes(8, "big")


def _reply_ctx(call: Call, request_args: Sequence[Any] | None) -> _Ctx:
    if request_args is None:
        return _Ctx(call.rep_s_sizes)
    if call.id == C_GetAttributeValue:
        return _Ctx(call.rep_s_sizes, [a.length == 0 for a in request_args[2]])
    if call.id == C_DeriveKey2:
        m = request_args[1]
        return _Ctx(call.rep_s_sizes, None, 0xFFFFFFFF if m is None else m.type)
    return _Ctx(call.rep_s_sizes)


class ReplyError(Exception):
    """The peer answered with an ERROR frame carrying ``rv``."""

    def __init__(self, rv: int) -> None:
        super().__init__(ckr.name(rv))
        self.rv = rv

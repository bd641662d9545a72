"""Primitive encodings (SPEC §3.2): byte, u32, u64, byte array. Pure, no I/O."""

from __future__ import annotations

import struct
from typing import Any

from .errors import ProtocolError

NULL_ARRAY = 0xFFFFFFFF
#: byte arrays of this length or more are invalid (except the NULL marker)
MAX_ARRAY = 0x7FFFFFFF

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Sequential reader over one message body; any overrun is a ProtocolError."""

    __slots__ = ("_buf", "_end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._buf = data
        self._end = len(data)
        self.pos = pos

    def remaining(self) -> int:
        return self._end - self.pos

    def byte(self) -> int:
        p = self.pos
        if p >= self._end:
            raise ProtocolError("truncated: byte")
        self.pos = p + 1
        return self._buf[p]

    def u32(self) -> int:
        p = self.pos
        if p + 4 > self._end:
            raise ProtocolError("truncated: u32")
        self.pos = p + 4
        return int(_U32.unpack_from(self._buf, p)[0])

    def u64(self) -> int:
        p = self.pos
        if p + 8 > self._end:
            raise ProtocolError("truncated: u64")
        self.pos = p + 8
        return int(_U64.unpack_from(self._buf, p)[0])

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Several fixed-width fields at once (a fast path's one struct)."""
        p = self.pos
        if p + layout.size > self._end:
            raise ProtocolError("truncated: fields")
        self.pos = p + layout.size
        return layout.unpack_from(self._buf, p)

    def raw(self, n: int) -> bytes:
        p = self.pos
        if n < 0 or p + n > self._end:
            raise ProtocolError("truncated: raw bytes")
        self.pos = p + n
        return bytes(self._buf[p : p + n])

    def array(self) -> bytes | None:
        """Byte array: u32 length + data; ``ffffffff`` is NULL (returns None)."""
        n = self.u32()
        if n == NULL_ARRAY:
            return None
        if n >= MAX_ARRAY:
            raise ProtocolError("byte array length out of range")  # not n: see framing
        return self.raw(n)


class Writer:
    """Appends primitives to a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def byte(self, v: int) -> None:
        self.buf.append(v & 0xFF)

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v & 0xFFFFFFFF)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v & 0xFFFFFFFFFFFFFFFF)

    def raw(self, data: bytes) -> None:
        self.buf += data

    def array(self, data: bytes | None) -> None:
        if data is None:
            self.buf += b"\xff\xff\xff\xff"
            return
        if len(data) >= MAX_ARRAY:
            raise ValueError("byte array too long")
        self.buf += _U32.pack(len(data))
        self.buf += data

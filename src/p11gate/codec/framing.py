"""Frames (SPEC §2): 12-byte header (call code, options length, body length), options,
body. :class:`FrameReader` reassembles frames from arbitrary stream chunks."""

from __future__ import annotations

import struct
from collections.abc import Generator

from .errors import ProtocolError

HEADER = struct.Struct(">III")
HEADER_SIZE = HEADER.size
#: default bound on one frame's options + body; the protocol itself has none
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
MAX_OPTIONS = 4096


def build_frame(code: int, body: bytes, options: bytes = b"") -> bytes:
    return HEADER.pack(code, len(options), len(body)) + options + body


class Frame:
    __slots__ = ("body", "code", "options")

    def __init__(self, code: int, options: bytes, body: bytes) -> None:
        self.code = code
        self.options = options
        self.body = body


class FrameReader:
    """Incremental frame parser. ``feed`` returns the frames completed by a chunk.

    Sizes are checked from the header before anything is buffered, so a hostile length
    costs a closed connection, not memory.
    """

    __slots__ = ("_buf", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def pending(self) -> int:
        return len(self._buf)

    def has_frame(self) -> bool:
        """A whole frame is buffered (one a blocked connection has not taken yet)."""
        if len(self._buf) < HEADER_SIZE:
            return False
        _code, olen, blen = HEADER.unpack_from(self._buf, 0)
        return len(self._buf) >= HEADER_SIZE + olen + blen

    def clear(self) -> None:
        """Forget what is buffered (the connection is gone)."""
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        """Buffer ``data`` without parsing it (``feed(b"")`` parses it later)."""
        self._buf += data

    def _too_large(self, olen: int) -> str:
        # Not the lengths read: after a desync (or in a hostile stream) a "header" is
        # any 12 bytes of the stream, a PIN's among them; they never reach a log
        if olen > MAX_OPTIONS:
            return f"frame too large (options over {MAX_OPTIONS} bytes)"
        return f"frame too large (body over max_frame = {self.max_frame} bytes)"

    def feed(self, data: bytes) -> Generator[Frame, None, None]:
        if not self._buf and type(data) is bytes:
            # the common case: nothing carried over, so frames are sliced straight out
            # of the chunk, and only an incomplete tail is copied into the buffer
            yield from self._feed_chunk(data)
            return
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER_SIZE:
                code, olen, blen = HEADER.unpack_from(buf, pos)
                if olen > MAX_OPTIONS or blen > self.max_frame:
                    raise ProtocolError(self._too_large(olen))
                if code == 0:
                    raise ProtocolError("call code 0")
                total = HEADER_SIZE + olen + blen
                if end - pos < total:
                    break
                start = pos + HEADER_SIZE
                frame = Frame(
                    code, bytes(buf[start : start + olen]), bytes(buf[start + olen : pos + total])
                )
                # consumed before it is handed out: a reader that stops iterating (a
                # paused connection) must not see this frame again
                pos += total
                yield frame
        finally:
            if pos:
                del buf[:pos]

    def _feed_chunk(self, data: bytes) -> Generator[Frame, None, None]:
        """:meth:`feed` on an empty buffer: the same checks, without the copies."""
        pos = 0
        end = len(data)
        try:
            while end - pos >= HEADER_SIZE:
                code, olen, blen = HEADER.unpack_from(data, pos)
                if olen > MAX_OPTIONS or blen > self.max_frame:
                    raise ProtocolError(self._too_large(olen))
                if code == 0:
                    raise ProtocolError("call code 0")
                total = HEADER_SIZE + olen + blen
                if end - pos < total:
                    break
                start = pos + HEADER_SIZE
                frame = Frame(code, data[start : start + olen], data[start + olen : pos + total])
                pos += total  # consumed before it is handed out, as in feed()
                yield frame
        finally:
            if pos < end:
                self._buf += data[pos:] if pos else data

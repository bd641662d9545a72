"""One RPC connection from the agent to a gateway node: one call at a time, as the
p11-kit client makes them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..codec import (
    Dialect,
    ProtocolError,
    build_frame,
    decode_reply,
    dialect_for_version,
    encode_request,
)
from ..codec.framing import HEADER, HEADER_SIZE
from .nodes import Node, Streams

OPTIONS = b"p11gate-agent"


class NodeLost(ConnectionError):
    """The node closed the connection or sent garbage: whatever it held is gone."""


class NodeLink:
    def __init__(self, streams: Streams, node: Node, version: int, dialect: Dialect) -> None:
        self.reader, self.writer = streams
        self.node = node
        #: the protocol version the node agreed to
        self.version = version
        self.dialect = dialect
        self._code = 0
        #: its node's count of active connections no longer includes it
        self.released = False

    @classmethod
    async def open(cls, streams: Streams, node: Node, version: int) -> NodeLink:
        r, w = streams
        try:
            w.write(bytes([version]))
            await w.drain()
            got = await r.readexactly(1)
        except (OSError, asyncio.IncompleteReadError) as e:
            w.close()
            raise NodeLost(f"version exchange: {e}") from None
        return cls(streams, node, got[0], dialect_for_version(got[0]))

    async def call_body(self, body: bytes) -> bytes:
        """Send one encoded request, return the reply body."""
        self._code = (self._code + 1) & 0xFFFFFFFF or 1
        try:
            self.writer.write(build_frame(self._code, body, OPTIONS))
            await self.writer.drain()
            header = await self.reader.readexactly(HEADER_SIZE)
            code, olen, blen = HEADER.unpack(header)
            rest = await self.reader.readexactly(olen + blen)
        except (OSError, asyncio.IncompleteReadError) as e:
            raise NodeLost(f"{e.__class__.__name__}: {e}") from None
        if code != self._code:
            raise NodeLost(f"reply code {code} for request {self._code}")
        return rest[olen:]

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """One call; an ERROR reply raises codec.ReplyError."""
        body = await self.call_body(encode_request(call_id, args, self.dialect))
        try:
            return decode_reply(body, self.dialect, call_id, args)
        except ProtocolError as e:
            raise NodeLost(f"bad reply: {e}") from None

    def closed(self) -> bool:
        """The node closed the connection while it was idle (a process that dies closes
        its sockets): the agent moves before it sends, so no call is lost with it."""
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

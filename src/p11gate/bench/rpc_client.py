"""A pipelining p11-kit RPC client on asyncio, for load that needs many concurrent
sessions on few connections (pool benchmarks, session-pooling tests).

Requests carry distinct call codes; the gateway answers calls on different sessions
concurrently and echoes each code, so replies are matched by code.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any

from ..codec import HANDSHAKE, V0241, build_frame, decode_reply, encode_request

HEADER = struct.Struct(">III")


class AsyncRpcClient:
    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        self._codes = itertools.count(0x100)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str) -> AsyncRpcClient:
        c = cls()
        c._reader, c._writer = await asyncio.open_unix_connection(path, limit=1 << 22)
        c._writer.write(b"\x00")
        await c._reader.readexactly(1)
        c._task = asyncio.get_running_loop().create_task(c._read())
        await c.call(1, [HANDSHAKE, 0, b"\0"])
        return c

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                code, olen, blen = HEADER.unpack(await self._reader.readexactly(12))
                rest = await self._reader.readexactly(olen + blen)
                entry = self._pending.pop(code, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(rest[olen:])
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"gateway closed the connection: {e}"))
            self._pending.clear()

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """One call; raises codec.ReplyError for an ERROR reply."""
        assert self._writer is not None
        code = next(self._codes)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[code] = (fut, call_id)
        self._writer.write(build_frame(code, encode_request(call_id, args, V0241), b"client"))
        body = await fut
        return decode_reply(body, V0241, call_id, args)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()

"""Byte relays between a local stream and a TLS connection to a gateway.

The RPC stream passes through untouched (version byte, frames): the tunnel and the
agent only carry it, so they work with every p11-kit client version and add no parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from .nodes import NoGateway
from .tls import parse_tls_address

log = logging.getLogger("p11gate.remote")

CHUNK = 256 * 1024


async def open_tls(addresses: list[str], ctx: ssl.SSLContext, timeout: float = 5.0,
                   first: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Connect to the first gateway that answers, trying them in order from ``first``
    (wrapping around). Returns the streams and the index of the one that answered."""
    errors = []
    n = len(addresses)
    for k in range(n):
        i = (first + k) % n
        host, port = parse_tls_address(addresses[i])
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host,
                                        limit=CHUNK),
                timeout)
            return r, w, i
        except (OSError, TimeoutError, ssl.SSLError) as e:
            errors.append(f"{addresses[i]}: {e.__class__.__name__}: {e}")
            log.warning("gateway unreachable, trying the next",
                        extra={"address": addresses[i], "error": str(e)})
    raise NoGateway("no gateway reachable (" + "; ".join(errors) + ")")


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while True:
        data = await src.read(CHUNK)
        if not data:
            return
        dst.write(data)
        await dst.drain()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Relay both ways until either side closes, then close both."""
    tasks = [asyncio.ensure_future(_pump(a[0], b[1])), asyncio.ensure_future(_pump(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                w.close()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

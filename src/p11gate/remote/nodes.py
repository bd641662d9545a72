"""The gateway nodes an agent knows, which of them are healthy, and which one takes the
next connection.

New connections go to the healthy node with the fewest connections open through this
agent (ties: round robin), so load spreads instead of piling onto "the first that
answers". A node that fails a connect, or dies under a connection, is put on back-off:
it is skipped until its back-off ends (1 s, doubling per failure up to 60 s), and a
health check (TLS handshake, C_GetInfo) brings it back as soon as it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

from ..codec import V0241, build_frame, encode_request
from ..codec.framing import HEADER_SIZE
from .tls import parse_tls_address

log = logging.getLogger("p11gate.remote")

CHUNK = 256 * 1024
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
C_GET_INFO = 3


class NoGateway(ConnectionError):
    """None of the configured gateway addresses accepted a TLS connection."""


@dataclass
class Node:
    address: str
    active: int = 0
    failures: int = 0
    #: monotonic time before which the node is skipped (0: healthy)
    down_until: float = 0.0
    connections: int = 0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Releasable(Protocol):
    node: Node
    released: bool


async def tls_connect(address: str, ctx: ssl.SSLContext, timeout: float) -> Streams:
    host, port = parse_tls_address(address)
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=host, limit=CHUNK),
        timeout)


class NodeSet:
    def __init__(self, addresses: list[str], ctx: ssl.SSLContext, timeout: float,
                 check_interval: float = 2.0) -> None:
        self.nodes = [Node(a) for a in addresses]
        self.ctx = ctx
        self.timeout = timeout
        self.check_interval = check_interval
        self._next = 0
        self._checker: asyncio.Task[None] | None = None

    def order(self, exclude: Node | None = None) -> list[Node]:
        """Healthy nodes, fewest connections first (round robin among equals), then
        the ones on back-off, soonest back first: the last resort when all are down."""
        now = time.monotonic()
        n = len(self.nodes)
        start = self._next
        self._next = (self._next + 1) % n
        rotated = [self.nodes[(start + k) % n] for k in range(n)]
        rotated = [x for x in rotated if x is not exclude] + (
            [exclude] if exclude is not None else [])
        healthy = sorted((x for x in rotated if x.healthy(now)), key=lambda x: x.active)
        down = sorted((x for x in rotated if not x.healthy(now)), key=lambda x: x.down_until)
        return healthy + down

    def mark_down(self, node: Node, error: str) -> None:
        node.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (node.failures - 1))
        node.down_until = time.monotonic() + delay
        log.warning("gateway unreachable, trying the next",
                    extra={"address": node.address, "error": error, "retry_in": delay})

    def mark_up(self, node: Node) -> None:
        if node.failures:
            log.info("gateway back", extra={"address": node.address})
        node.failures = 0
        node.down_until = 0.0

    async def connect(self, exclude: Node | None = None) -> tuple[Streams, Node]:
        """A TLS connection to the best node (see :meth:`order`); its ``active`` count
        is raised, the caller lowers it with :meth:`release`."""
        errors = []
        for node in self.order(exclude):
            # counted from the start of its handshake, not its end: applications that
            # connect at once (a burst) would otherwise all see the same counts and
            # pile onto one node
            node.active += 1
            try:
                streams = await tls_connect(node.address, self.ctx, self.timeout)
            except BaseException as e:
                self.release(node)
                if not isinstance(e, (OSError, TimeoutError, ssl.SSLError)):
                    raise
                errors.append(f"{node.address}: {e.__class__.__name__}: {e}")
                self.mark_down(node, str(e))
                continue
            self.mark_up(node)
            node.connections += 1
            return streams, node
        raise NoGateway("no gateway reachable (" + "; ".join(errors) + ")")

    def release(self, node: Node) -> None:
        node.active = max(0, node.active - 1)

    def release_link(self, link: Releasable) -> None:
        """Once per link, however many ways it ends."""
        if not link.released:
            link.released = True
            self.release(link.node)

    def start_checks(self) -> None:
        if self._checker is None and len(self.nodes) > 1:
            self._checker = asyncio.get_running_loop().create_task(self._check_loop())

    async def stop_checks(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(BaseException):
                await self._checker
            self._checker = None

    async def _check_loop(self) -> None:
        """Probe the nodes on back-off whose back-off is over (see :meth:`probe`)."""
        while True:
            await asyncio.sleep(self.check_interval)
            now = time.monotonic()
            for node in self.nodes:
                if node.down_until and node.down_until <= now:
                    await self.probe(node)

    async def probe(self, node: Node) -> bool:
        """A TLS handshake, the version byte and one C_GetInfo: any well-formed reply
        (an ERROR one too) shows the node serves RPC, not only that it accepts."""
        w = None
        try:
            r, w = await tls_connect(node.address, self.ctx, self.timeout)
            w.write(b"\0" + build_frame(1, encode_request(C_GET_INFO, [], V0241), b"probe"))
            await w.drain()
            await asyncio.wait_for(r.readexactly(1 + HEADER_SIZE), self.timeout)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.mark_down(node, f"health check: {e.__class__.__name__}: {e}")
            return False
        finally:
            if w is not None:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
        self.mark_up(node)
        return True

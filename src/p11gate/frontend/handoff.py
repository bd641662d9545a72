"""Connections handed by the supervisor to the gateway processes (``[server] processes``).

Why the supervisor accepts, not every process on one shared listener: the kernel wakes
every process waiting in accept and whichever runs first takes the connection (asyncio
takes the whole backlog at once), so on a lightly loaded machine one process may serve
every client while the others idle. Instead the supervisor accepts and passes each
connection's descriptor (SCM_RIGHTS over a SOCK_SEQPACKET pair, one per process) to the
process with the fewest open connections, ties in turn. The descriptor keeps what
identifies the client: a unix socket's SO_PEERCRED is the connecting process's, and a
TLS client's certificate is read by the process that runs the handshake.

Messages, one per packet:

* supervisor → process: the listener's index (2 bytes, network order) and one
  descriptor;
* process → supervisor: a load report, the connections it received and the ones it has
  open (8 bytes each), sent whenever either changes. The supervisor counts a connection
  it handed but the process has not reported yet as open (``Lane.load``), so a late
  report never sends two connections in a row to the same process.

Nothing is lost when a process dies: the supervisor keeps a duplicate of each
descriptor it handed until the process's report counts it received. Descriptors still
in flight in a dead process's pair are closed by the kernel with it; the supervisor then
hands its duplicates of them to the other processes (``Balancer.rehome``), so a client
that connected just as a process died is served by another instead of reset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("p11gate.server")

#: the descriptor of a process's end of its pair, in its environment
HANDOFF_ENV = "P11GATE_HANDOFF_FD"
_LISTENER = struct.Struct("!H")
_REPORT = struct.Struct("!QQ")
#: descriptors taken from the pair per wake-up, so one burst cannot starve the loop
_BATCH = 64


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the process's end); the supervisor's never blocks."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


@dataclass
class Lane:
    """What the supervisor knows of one process."""

    channel: socket.socket | None = None
    ready: bool = False
    handed: int = 0
    received: int = 0
    open: int = 0
    #: (sequence number, listener, our duplicate) of each connection handed that the
    #: process has not yet reported received
    unacked: collections.deque[tuple[int, int, socket.socket]] = field(
        default_factory=collections.deque)

    def load(self) -> int:
        return self.open + max(0, self.handed - self.received)

    def reset(self, channel: socket.socket | None) -> None:
        if self.channel is not None:
            with contextlib.suppress(OSError):
                self.channel.close()
        self.channel, self.ready = channel, False
        self.handed = self.received = self.open = 0
        self._drop_unacked(None)

    def take_unacked(self) -> list[tuple[int, socket.socket]]:
        """The connections handed but never reported received: (listener, duplicate)."""
        out = [(listener, dup) for _seq, listener, dup in self.unacked]
        self.unacked.clear()
        return out

    def _drop_unacked(self, upto: int | None) -> None:
        """Close our duplicates of the connections received (all, with None)."""
        q = self.unacked
        while q and (upto is None or q[0][0] <= upto):
            q.popleft()[2].close()

    def read_reports(self) -> bool:
        """Takes every waiting report; False when the process's end is closed."""
        assert self.channel is not None
        while True:
            try:
                data = self.channel.recv(64)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            if len(data) == _REPORT.size:
                self.received, self.open = _REPORT.unpack(data)
                self._drop_unacked(self.received)


class Balancer:
    """Picks the process for each new connection: fewest open, ties in turn."""

    def __init__(self, count: int) -> None:
        self.lanes = [Lane() for _ in range(count)]
        self._turn = 0

    def order(self) -> list[int]:
        n = len(self.lanes)
        live = [i for i, lane in enumerate(self.lanes) if lane.ready and lane.channel]
        return sorted(live, key=lambda i: (self.lanes[i].load(), (i - self._turn) % n))

    def hand(self, listener: int, conn: socket.socket) -> bool:
        """Passes ``conn`` to one process (the caller closes its own copy); False when
        no process could take it."""
        for i in self.order():
            lane = self.lanes[i]
            assert lane.channel is not None
            try:
                dup = conn.dup()  # kept until the process reports it received
            except OSError:
                return False
            try:
                socket.send_fds(lane.channel, [_LISTENER.pack(listener)], [conn.fileno()])
            except OSError:  # full (a stuck process) or gone: the next one
                dup.close()
                continue
            lane.handed += 1
            lane.unacked.append((lane.handed, listener, dup))
            self._turn = (i + 1) % len(self.lanes)
            return True
        return False

    def rehome(self, index: int) -> int:
        """Process ``index`` died: hand the connections it never received to the others
        (call before its lane is reset). Returns how many found a new process."""
        lane = self.lanes[index]
        lane.ready = False
        moved = 0
        for listener, dup in lane.take_unacked():
            with dup:
                if self.hand(listener, dup):
                    moved += 1
                else:
                    log.warning("a connection handed to a process that died found no "
                                "other; closed it")
        return moved


Adopter = Callable[[socket.socket], None]


class Receiver:
    """A gateway process's end: takes each handed connection to the adopter of its
    listener and reports its load back."""

    def __init__(self, channel: socket.socket, open_count: Callable[[], int]) -> None:
        channel.setblocking(False)
        self.channel = channel
        self.open_count = open_count
        self.adopters: dict[int, Adopter] = {}
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, listener: int, adopter: Adopter) -> None:
        self.adopters[listener] = adopter

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.channel.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.channel.fileno())
            self._loop = None
        with contextlib.suppress(OSError):
            self.channel.close()

    def _readable(self) -> None:
        for _ in range(_BATCH):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, 16, 4)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.error("the supervisor's channel failed", extra={"error": str(e)})
                self._gone()
                return
            if not data and not fds:
                self._gone()
                return
            self._take(data, fds)
        # after the adopters' tasks made their connections (call_soon runs in order)
        if self._loop is not None:
            self._loop.call_soon(self.report)

    def _take(self, data: bytes, fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        adopter = (self.adopters.get(_LISTENER.unpack(data)[0])
                   if len(data) == _LISTENER.size else None)
        if socks:
            self.received += 1  # off the pair: the supervisor may drop its duplicate
        if adopter is None or len(socks) != 1:
            # not what the supervisor sends: nothing to serve it with
            for s in socks:
                s.close()
            log.error("the supervisor handed a connection no listener takes")
            return
        socks[0].setblocking(False)
        adopter(socks[0])

    def report(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(OSError):  # full or gone: the next report says it all
            self.channel.send(_REPORT.pack(self.received, self.open_count()))

    def _gone(self) -> None:
        # the supervisor is gone: the connections open are served on, no new ones come
        log.warning("the supervisor closed its channel; no new connections")
        self.close()

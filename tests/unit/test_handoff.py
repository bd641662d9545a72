"""The supervisor's hand-off of connections to the gateway processes (frontend/handoff.py),
on real socket pairs: the least loaded process first, ties in turn; a connection handed
but not yet reported counts; a full or closed channel is skipped; the descriptor that
arrives is the client's connection (its peer credentials included)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from p11gate.frontend.handoff import Balancer, Receiver, channel_pair


def _peercred(s: socket.socket) -> tuple[int, int, int]:
    got = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", got)
    return pid, uid, gid


def _ready(b: Balancer) -> list[socket.socket]:
    theirs = []
    for lane in b.lanes:
        ours, other = channel_pair()
        lane.reset(ours)
        lane.ready = True
        theirs.append(other)
    return theirs


def test_ties_go_in_turn_and_a_handed_connection_counts_before_its_report() -> None:
    b = Balancer(3)
    ends = _ready(b)
    picked = []
    for _ in range(6):
        first = b.order()[0]
        a, c = socket.socketpair()
        assert b.hand(0, a)
        a.close()
        c.close()
        picked.append(first)
    # nobody reported: every handed connection counts as open
    assert picked == [0, 1, 2, 0, 1, 2]
    assert [lane.load() for lane in b.lanes] == [2, 2, 2]
    # process 1 reports it has 2 received and closed both: it takes the next two
    ends[1].send(struct.pack("!QQ", 2, 0))
    assert b.lanes[1].read_reports()
    assert b.lanes[1].load() == 0
    assert [b.order()[0] for _ in range(1)] == [1]
    for e in ends:
        e.close()


def test_a_stale_report_does_not_hide_a_connection_in_flight() -> None:
    b = Balancer(2)
    ends = _ready(b)
    for _ in range(3):
        a, c = socket.socketpair()
        assert b.hand(0, a)
        a.close()
        c.close()
    # process 0 got two, reported only the first one: 1 open + 1 in flight
    ends[0].send(struct.pack("!QQ", 1, 1))
    assert b.lanes[0].read_reports()
    assert b.lanes[0].load() == 2 and b.lanes[1].load() == 1
    assert b.order()[0] == 1
    for e in ends:
        e.close()


def test_a_closed_or_full_channel_is_skipped_and_none_left_refuses() -> None:
    b = Balancer(2)
    ends = _ready(b)
    ends[0].close()  # process 0 died
    assert not b.lanes[0].read_reports()
    a, c = socket.socketpair()
    assert b.hand(0, a) and b.lanes[1].handed == 1 and b.lanes[0].handed == 0
    # process 1 never reads: its channel fills, then nobody can take one
    handed = 0
    while b.hand(0, a):
        handed += 1
        assert handed < 100_000
    assert handed > 10
    a.close()
    c.close()
    ends[1].close()


def test_the_process_gets_the_clients_connection_and_reports_its_load() -> None:
    async def run() -> None:
        b = Balancer(1)
        ours, theirs = channel_pair()
        b.lanes[0].reset(ours)
        b.lanes[0].ready = True
        adopted: list[socket.socket] = []
        opened: list[int] = []
        r = Receiver(theirs, lambda: len(opened))
        r.serve(7, adopted.append)
        r.start()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = f"/tmp/p11gate-handoff-{os.getpid()}.sock"
        server.bind(path)
        server.listen()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        conn, _ = server.accept()
        os.unlink(path)
        assert b.hand(7, conn)
        conn.close()  # the supervisor's copy: the process's copy keeps it open
        for _ in range(100):
            await asyncio.sleep(0.01)
            if adopted:
                break
        assert len(adopted) == 1
        got = adopted[0]
        assert _peercred(got) == (os.getpid(), os.getuid(), os.getgid())
        client.sendall(b"ping")
        got.setblocking(True)
        assert got.recv(4) == b"ping"
        # the report after the batch: received, its connection not made yet
        assert b.lanes[0].read_reports()
        assert (b.lanes[0].received, b.lanes[0].open, b.lanes[0].load()) == (1, 0, 0)
        opened.append(1)
        r.report()  # what the gateway does when its connections change
        assert b.lanes[0].read_reports()
        assert (b.lanes[0].received, b.lanes[0].open, b.lanes[0].load()) == (1, 1, 1)
        # a listener index nobody serves: the descriptor is closed, nothing adopted
        a, c = socket.socketpair()
        assert b.hand(3, a)
        a.close()
        await asyncio.sleep(0.05)
        assert len(adopted) == 1
        # its report counts it received: the supervisor drops its duplicate
        assert b.lanes[0].read_reports() and not b.lanes[0].unacked
        c.settimeout(2)
        assert c.recv(1) == b""  # closed by the process
        c.close()
        got.close()
        client.close()
        r.close()
        server.close()
        ours.close()

    asyncio.run(run())


def test_connections_in_flight_to_a_process_that_dies_go_to_another() -> None:
    """A descriptor handed to a process that dies before taking it is closed by the
    kernel with the process's end; the supervisor's duplicate goes to the other
    process, which gets the very client connection. One the process reported received
    is not handed again."""
    b = Balancer(2)
    ends = _ready(b)
    client, conn = socket.socketpair()
    assert b.order()[0] == 0 and b.hand(0, conn)
    conn.close()  # the caller's copy, as the supervisor does
    assert len(b.lanes[0].unacked) == 1
    ends[0].close()  # process 0 dies without reading its pair
    assert b.rehome(0) == 1
    assert not b.lanes[0].unacked and not b.lanes[0].ready
    data, fds, _flags, _addr = socket.recv_fds(ends[1], 16, 4)
    assert struct.unpack("!H", data)[0] == 0 and len(fds) == 1
    moved = socket.socket(fileno=fds[0])
    client.sendall(b"\x00")  # the client's bytes reach the process that took over
    assert moved.recv(1) == b"\x00"
    moved.sendall(b"\x01")
    assert client.recv(1) == b"\x01"
    # process 1 reports it received that one: nothing is left to hand again
    ends[1].send(struct.pack("!QQ", 1, 1))
    assert b.lanes[1].read_reports() and not b.lanes[1].unacked
    assert b.rehome(1) == 0
    for s in (client, moved, ends[1]):
        s.close()

"""Fourth review (connection layer): replies a client never reads, and calls stuck in
flight, count against the identity's budget at what they cost in memory.

Before: the transport's buffer of one connection counted against
max_buffered_bytes_per_identity only once it passed max_pending_reply_bytes (so one uid
held 3 MiB on each of its 256 connections uncounted), small replies cost the gateway some
3 times their bytes (a transport keeps one buffer object per write), and calls read past
max_calls_in_flight after a stall (thousands per connection, each some 2 KiB) counted
against nothing shared. Real `p11gate serve`, raw frames, SoftHSM; a second uid signs
meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import ID
from tests.adversarial.limits_helpers import config, rss, sign_n
from tests.gateway_proc import Gateway, RawClient, wait_for, worker_pids
from tests.policy.tenants import as_uid, remove, shared_socket_dir
from tests.softhsm import make_token

from p11gate.codec import build_frame, encode_reply, encode_request

MiB = 1 << 20
BYSTANDER = 1002


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm"))


@contextlib.contextmanager
def gateway(token: dict[str, Any], base: Path, extra: str, isolation: str = "process",
            call_timeout: float = 30.0) -> Iterator[Gateway]:
    d = shared_socket_dir()
    cfg = config(base, d / "gw.sock", token, extra)
    cfg.write_text(cfg.read_text().replace(
        "call_timeout = 10.0", f'call_timeout = {call_timeout}\nisolation = "{isolation}"'))
    gw = Gateway(cfg)
    try:
        yield gw
    finally:
        gw.stop()
        remove(d)


def _session(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path, timeout=30)
    c.initialize()
    (slots,) = c.call(ID("C_GetSlotList"), [1, 8])
    (sess,) = c.call(ID("C_OpenSession"), [slots[0], 6])
    # the client's receive buffer as small as the kernel allows: nothing is read
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return c, sess


def _push(c: RawClient, data: bytes, seconds: float) -> int:
    """Send what the gateway takes within ``seconds`` (it may close the connection);
    the bytes sent."""
    c.sock.setblocking(False)
    sent, end = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < end:
        try:
            sent += c.sock.send(data[sent:])
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break  # closed by the gateway (a limit)
    return sent


def _peak_growth(gw: Gateway, base: int) -> float:
    """Sample the gateway's and workers' RSS until it has not changed by 1 MiB for 2 s
    (the gateway has taken what it will take); the largest growth seen, MiB."""
    peak, last, since = 0, -1, time.monotonic()

    def settled() -> bool:
        nonlocal peak, last, since
        now = rss(gw)
        peak = max(peak, now - base)
        if abs(now - last) > MiB:
            last, since = now, time.monotonic()
        return time.monotonic() - since > 2.0

    assert wait_for(settled, timeout=120, interval=0.1)
    return peak / MiB


def _closed_for_budget(gw: Gateway) -> int:
    return sum(1 for r in gw.records()
               if r.get("limit") == "max_buffered_bytes_per_identity")


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_unsent_replies_below_the_transport_mark_count_for_the_identity(
        token: dict[str, Any], tmp_path: Path, isolation: str) -> None:
    """40 connections of one uid each ask for 3 × 1 MiB of random bytes (under
    max_pending_reply_bytes, 4 MiB) and never read, with a 32 MiB identity budget: the
    gateway closes those beyond it and grows < 80 MiB (before: none closed, ~140 MiB,
    and 256 connections would hold ~900 MiB); another uid signs with zero errors."""
    with gateway(token, tmp_path, "max_buffered_bytes_per_identity = 33554432",
                 isolation) as gw:
        assert as_uid(BYSTANDER, sign_n, gw.path, 5) == {"ok": 5, "errors": []}
        base = rss(gw)
        held = []
        for _ in range(40):
            c, sess = _session(gw)
            req = encode_request(ID("C_GenerateRandom"), [sess, MiB], c.dialect)
            _push(c, b"".join(build_frame(0x100 + i, req) for i in range(3)), seconds=10)
            held.append(c)
        growth = _peak_growth(gw, base)
        print(f"\n{isolation}: 40 × 3 MiB unread: RSS growth {growth:.0f} MiB, "
              f"{_closed_for_budget(gw)} closed for the identity's budget")
        assert as_uid(BYSTANDER, sign_n, gw.path, 20) == {"ok": 20, "errors": []}
        assert _closed_for_budget(gw) > 0
        assert growth < 80, f"RSS grew {growth:.0f} MiB"
        for c in held:
            c.close()
        assert gw.alive()


def test_small_unread_replies_cost_their_bytes(token: dict[str, Any],
                                               tmp_path: Path) -> None:
    """8 connections each pipeline C_GenerateRandom of one byte until their replies
    nearly fill max_pending_reply_bytes (1 MiB here) and never read: the gateway grows
    < 48 MiB (measured ~20; before: ~165 MiB, the transport's ~600 bytes for each
    28-byte reply)."""
    with gateway(token, tmp_path, f"max_pending_reply_bytes = {MiB}") as gw:
        base = rss(gw)
        held = []
        for _ in range(8):
            c, sess = _session(gw)
            args = [sess, 1]
            req = encode_request(ID("C_GenerateRandom"), args, c.dialect)
            reply = build_frame(1, encode_reply(ID("C_GenerateRandom"), [b"x"], c.dialect,
                                                args))
            n = int(0.9 * MiB) // len(reply)
            data = b"".join(build_frame(0x100 + i, req) for i in range(n))
            assert _push(c, data, seconds=120) == len(data)
            held.append(c)
        growth = _peak_growth(gw, base)
        print(f"\n8 × {n} one-byte replies unread: RSS growth {growth:.0f} MiB")
        assert growth < 48, f"RSS grew {growth:.0f} MiB"
        # only paused: each connection gets its replies once it reads
        c = held[0]
        c.sock.setblocking(True)
        c.sock.settimeout(30)
        for _ in range(n):
            frame = c.recv_frame()
            assert frame is not None and len(frame[1]) < 64
        for c in held:
            c.close()
        assert gw.alive()


def test_calls_read_past_the_count_bound_count_for_the_identity(
        token: dict[str, Any], tmp_path: Path) -> None:
    """The worker is stopped (a backend busy with slow calls, deterministically); 40
    connections of one uid each pipeline 8,000 calls on one session: none is answered
    for 0.5 s, so each reads on past max_calls_in_flight, bounded by bytes alone. Those
    calls in flight count against the identity's 32 MiB budget (connections beyond it
    are closed) and the gateway grows < 150 MiB (measured ~95; before: none closed,
    ~165 MiB, ~4 MiB more for each further connection up to 256). Resumed, the worker
    serves another uid with zero errors."""
    with gateway(token, tmp_path, "max_buffered_bytes_per_identity = 33554432",
                 call_timeout=120) as gw:
        assert as_uid(BYSTANDER, sign_n, gw.path, 5) == {"ok": 5, "errors": []}
        (worker,) = worker_pids(gw)
        held = [_session(gw) for _ in range(40)]
        base = rss(gw)
        os.kill(worker, signal.SIGSTOP)
        try:
            for c, sess in held:
                req = encode_request(ID("C_GenerateRandom"), [sess, 1], c.dialect)
                _push(c, b"".join(build_frame(0x100 + i, req) for i in range(8000)),
                      seconds=1)
            growth = _peak_growth(gw, base)
        finally:
            os.kill(worker, signal.SIGCONT)
        print(f"\n40 × 8,000 calls on a stopped worker: RSS growth {growth:.0f} MiB, "
              f"{_closed_for_budget(gw)} closed for the identity's budget")
        assert _closed_for_budget(gw) > 0
        assert growth < 150, f"RSS grew {growth:.0f} MiB"
        for c, _ in held:
            c.close()
        assert as_uid(BYSTANDER, sign_n, gw.path, 20) == {"ok": 20, "errors": []}
        assert gw.alive()


def test_connections_gone_behind_a_stalled_backend_keep_no_read_buffers(
        token: dict[str, Any], tmp_path: Path) -> None:
    """A connection closed while its calls are at a stopped backend lives on until they
    end (its cleanup closes its sessions after them) and kept the request bytes read but
    not parsed, up to a read chunk (256 KiB): 5 rounds of 30 such connections grew the
    gateway ~7 MiB a round. Now they are dropped at the hang-up: rounds 2-5 add < 8 MiB
    (before: ~28)."""
    with gateway(token, tmp_path, "max_buffered_bytes_per_identity = 33554432",
                 call_timeout=300) as gw:
        (worker,) = worker_pids(gw)
        sessions = [_session(gw) for _ in range(150)]
        os.kill(worker, signal.SIGSTOP)
        try:
            after: list[int] = []
            for r in range(5):
                held = sessions[30 * r:30 * (r + 1)]
                for c, sess in held:
                    req = encode_request(ID("C_GenerateRandom"), [sess, 1], c.dialect)
                    _push(c, b"".join(build_frame(0x100 + i, req) for i in range(8000)),
                          seconds=1)
                _peak_growth(gw, 0)  # the gateway has taken what it will take
                for c, _ in held:
                    c.close()
                _peak_growth(gw, 0)  # and has seen them go
                after.append(rss(gw))
        finally:
            os.kill(worker, signal.SIGCONT)
        growth = (after[-1] - after[0]) / MiB
        print(f"\nRSS after each round of 30 closed connections: "
              f"{[round(a / MiB) for a in after]} MiB")
        assert growth < 8, f"RSS grew {growth:.0f} MiB over rounds 2-5"
        assert as_uid(BYSTANDER, sign_n, gw.path, 20) == {"ok": 20, "errors": []}
        assert gw.alive()

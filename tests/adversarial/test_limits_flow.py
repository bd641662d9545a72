"""ConnectionFlow and LogLimiter on their own: a hostile client's pipelining is paused,
never dropped or replayed; reused call codes never make promised bytes undercount; a
flood of limit hits gives a bounded number of log records."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from p11gate.codec import (
    V0241,
    FrameReader,
    ProtocolError,
    build_frame,
    decode_request,
    encode_request,
)
from p11gate.config import ServerConfig
from p11gate.frontend.limits import STALL_SECONDS, ConnectionFlow, IdentityUsage, LogLimiter

C_GenerateRandom = 64


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.paused = False
        self.aborted = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def random_frame(code: int, n: int) -> bytes:
    return build_frame(code, encode_request(C_GenerateRandom, [1, n], V0241))


def make_flow(**cfg: Any) -> tuple[ConnectionFlow, FakeTransport, list[int], list[str]]:
    seen: list[int] = []
    aborted: list[str] = []
    flow: ConnectionFlow

    def dispatch(code: int, body: bytes) -> None:
        seen.append(code)
        call, args = decode_request(body, V0241)
        flow.started(code, call.id, args)

    flow = ConnectionFlow(ServerConfig(**cfg), FrameReader(1 << 20), 1, dispatch,
                          aborted.append)
    t = FakeTransport()
    flow.attach(t)  # type: ignore[arg-type]
    return flow, t, seen, aborted


def test_in_flight_bound_pauses_and_resumes_without_loss_or_replay() -> None:
    async def run() -> None:
        flow, t, seen, _ = make_flow(max_calls_in_flight=3)
        flow.receive(b"".join(random_frame(100 + i, 32) for i in range(10)))
        assert seen == [100, 101, 102] and t.paused
        for code in (100, 101, 102):
            flow.finished(code)
        assert seen[:6] == [100, 101, 102, 103, 104, 105]
        while len(seen) < 10:
            flow.finished(seen[len(seen) - 3])
        assert seen == list(range(100, 110))  # each exactly once, in order
    asyncio.run(run())


def test_promised_bytes_pause_and_reused_codes_never_undercount() -> None:
    async def run() -> None:
        flow, t, seen, _ = make_flow(max_pending_reply_bytes=1 << 20, max_buffer=1 << 20)
        flow.receive(random_frame(7, 1 << 20) + random_frame(7, 16) + random_frame(8, 16))
        assert seen == [7] and t.paused  # 1 MiB promised: nothing more is read
        assert flow.promised > 1 << 20
        flow.finished(7)  # the big one finished: the next frames are taken
        assert seen == [7, 7, 8] and not t.paused
        flow.finished(7)
        flow.finished(8)
        assert flow.promised == 0 and flow.in_flight == 0
        # a big and a small call with one code: whichever is answered first, the
        # smaller promise is released, so what is in flight is never undercounted
        flow.receive(random_frame(9, 512 * 1024) + random_frame(9, 16))
        assert seen[-2:] == [9, 9]
        flow.finished(9)
        assert flow.promised > 512 * 1024
        flow.finished(9)
        assert flow.promised == 0
    asyncio.run(run())


def test_unread_replies_pause_reading_until_the_client_reads() -> None:
    async def run() -> None:
        flow, t, seen, _ = make_flow(max_pending_reply_bytes=1 << 20)
        t.buffered = 2 << 20
        flow.pause_writing()
        flow.receive(random_frame(1, 16))
        assert seen == [] and t.paused
        t.buffered = 0
        flow.resume_writing()
        assert seen == [1] and not t.paused
    asyncio.run(run())


def test_a_bad_frame_behind_a_pause_closes_the_connection() -> None:
    async def run() -> None:
        flow, _, seen, aborted = make_flow(max_calls_in_flight=1)
        flow.receive(random_frame(1, 16) + build_frame(0, b"\0\0\0\3"))  # code 0: bad
        assert seen == [1]
        flow.finished(1)
        assert aborted and "protocol error" in aborted[0]
    asyncio.run(run())


def test_stalled_frame_is_closed_at_the_deadline() -> None:
    async def run() -> None:
        flow, t, _, _ = make_flow(frame_timeout=0.2)
        whole = random_frame(1, 16)
        flow.receive(whole[:-1])
        await asyncio.sleep(0.1)
        flow.receive(b"")  # more bytes of the same frame do not extend the deadline
        await asyncio.sleep(0.2)
        assert t.aborted
    asyncio.run(run())


def test_protocol_errors_still_raise_from_receive() -> None:
    flow, _, _, _ = make_flow()
    with pytest.raises(ProtocolError):
        flow.receive(build_frame(0, b"\0\0\0\3"))


def test_log_limiter_summarises_a_flood(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.limits")
    lim = LogLimiter(logger, burst=5, period=0.2)

    async def run() -> None:
        for _ in range(1000):
            lim.warning("limit reached", limit="x")
        lim.warning("limit reached", limit="y")  # another limit has its own window
        await asyncio.sleep(0.4)

    with caplog.at_level(logging.WARNING, logger="test.limits"):
        asyncio.run(run())
    msgs = [r for r in caplog.records if r.name == "test.limits"]
    assert len(msgs) == 5 + 1 + 1
    summary = [r for r in msgs if "not logged one by one" in r.getMessage()]
    assert len(summary) == 1 and summary[0].count == 995  # type: ignore[attr-defined]


def test_calls_that_wait_for_unread_requests_do_not_deadlock() -> None:
    """At the count bound with none answered (they wait, e.g. for a pool session that
    an operation further down the stream would release), reading goes on after
    STALL_SECONDS, bounded by the byte budget alone; the bound returns once below it."""
    async def run() -> None:
        flow, t, seen, _ = make_flow(max_calls_in_flight=2, max_pending_reply_bytes=64 * 1024)
        flow.receive(b"".join(random_frame(i, 16) for i in range(1, 201)))
        assert seen == [1, 2] and t.paused
        await asyncio.sleep(STALL_SECONDS + 0.3)
        # read on, but only as far as the bytes budget (about 1 KiB a call) allows
        assert 2 < len(seen) < 100 and t.paused
        # answered one by one: every request is served exactly once, never more bytes
        # promised than the budget (plus the one call that crossed it)
        done = 0
        while done < len(seen):
            flow.finished(seen[done])
            done += 1
            assert flow.promised <= 64 * 1024 + 2048
        assert seen == list(range(1, 201)) and flow.in_flight == 0
    asyncio.run(run())


def test_replies_behind_a_full_transport_wait_in_order_and_count_for_the_identity() -> None:
    """Fourth review: past the transport's mark, replies wait in the connection's own
    buffer (their bytes, not a buffer object each), counted against the identity's
    budget, and go out after what the transport holds, in order."""
    async def run() -> None:
        flow, t, _, _ = make_flow()
        flow.usage = usage = IdentityUsage()
        flow.write(b"a")
        assert t.written == [b"a"]
        t.buffered = 100_000
        flow.pause_writing()
        flow.write(b"b" * 10)
        flow.write(b"c" * 10)
        assert t.written == [b"a"] and flow.unsent() == 100_020
        assert usage.buffered == 100_020
        t.buffered = 0
        flow.resume_writing()
        assert b"".join(t.written) == b"a" + b"b" * 10 + b"c" * 10
        assert usage.buffered == 0
    asyncio.run(run())

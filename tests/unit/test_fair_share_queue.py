"""The fair-share book: calls of one identity beyond its share wait in FIFO order while
other identities go ahead; the queue is bounded; queued calls of a closed client or
from before a backend restart never reach the backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p11gate.backends.base import Backend
from p11gate.codec import ckr
from p11gate.errors import BackendUnavailable, Pkcs11Error
from p11gate.frontend.fair_share import FairShare


class FakeBackend(Backend):
    """Records what reaches it; the test finishes each call by hand."""

    def __init__(self) -> None:
        self.name = "fake"
        self.sent: list[tuple[int, asyncio.Future[list[Any]]]] = []
        self.raw: list[int] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        return await self.submit(call_id, args)

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.sent.append((call_id, fut))
        return fut

    def submit_raw(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes] | None:
        self.raw.append(call_id)
        return asyncio.get_running_loop().create_future()

    @property
    def up(self) -> bool:
        return True

    def finish(self, call_id: int) -> None:
        fut = next(f for c, f in self.sent if c == call_id and not f.done())
        fut.set_result([call_id])


class Conn:
    closed = False


GEN, C_SIGN = 59, 43  # C_GenerateKeyPair, C_Sign


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_calls_beyond_the_share_wait_in_order_while_others_go_ahead() -> None:
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=2, max_queued=3)
        a = [share.submit("uid:A", 100 + i, []) for i in range(5)]
        assert [c for c, _ in b.sent] == [100, 101]  # A's share: two in flight
        assert share.in_flight("uid:A") == 2 and share.waiting("uid:A") == 3
        other = share.submit("uid:B", 200, [])
        assert [c for c, _ in b.sent] == [100, 101, 200]  # B is not behind A's queue
        with pytest.raises(Pkcs11Error) as e:
            share.submit("uid:A", 199, [])
        assert e.value.rv == ckr.FUNCTION_FAILED and share.refused == 1
        # a session-less raw relay of A must not bypass the share either
        assert share.submit_raw("uid:A", 300, []) is None and b.raw == []
        assert share.submit_raw("uid:C", 301, []) is not None and b.raw == [301]

        b.finish(101)  # a slot of A's frees: A's oldest waiting call takes it
        await _settle()
        assert [c for c, _ in b.sent] == [100, 101, 200, 102]
        b.finish(100)
        b.finish(102)
        await _settle()
        assert [c for c, _ in b.sent][4:] == [103, 104]
        b.finish(200)
        await _settle()
        assert other.result() == [200]
        b.finish(103)
        b.finish(104)
        await _settle()
        assert [f.result() for f in a] == [[100], [101], [102], [103], [104]]
        assert share.in_flight("uid:A") == 0 and share.waiting("uid:A") == 0
        assert share.describe()["queued_total"] == 3

    asyncio.run(main())


def test_a_queued_call_of_a_closed_client_or_an_old_backend_is_dropped() -> None:
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=1, max_queued=8)
        gone, here = Conn(), Conn()
        share.submit("uid:A", 1, [], here)
        dropped = share.submit("uid:A", 2, [], gone)
        stale = share.submit("uid:A", 3, [], here)
        kept = share.submit("uid:A", 4, [], here)
        gone.closed = True
        b.finish(1)
        await _settle()
        assert isinstance(dropped.exception(), BackendUnavailable)
        assert [c for c, _ in b.sent] == [1, 3]  # the closed client's call never ran
        b.generation += 1  # restarted: call 4's handles belong to the dead instance
        b.finish(3)
        await _settle()
        assert stale.result() == [3]
        assert isinstance(kept.exception(), BackendUnavailable)
        assert [c for c, _ in b.sent] == [1, 3] and share.in_flight("uid:A") == 0

    asyncio.run(main())


def test_a_client_that_hangs_up_has_its_queued_calls_dropped_at_once() -> None:
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=1, max_queued=8)
        gone, here = Conn(), Conn()
        share.submit("uid:A", 1, [], gone)
        mine = [share.submit("uid:A", 2 + i, [], gone) for i in range(3)]
        theirs = share.submit("uid:A", 9, [], here)
        assert share.drop_queued(gone) == 3
        assert all(isinstance(f.exception(), BackendUnavailable) for f in mine)
        assert share.waiting("uid:A") == 1
        b.finish(1)
        await _settle()
        assert [c for c, _ in b.sent] == [1, 9] and not theirs.done()

    asyncio.run(main())


def test_a_failed_call_passes_its_slot_on() -> None:
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=1, max_queued=0)
        first = share.submit("uid:A", 1, [])
        with pytest.raises(Pkcs11Error):
            share.submit("uid:A", 2, [])  # max_queued 0: refused at once beyond the share
        b.sent[0][1].set_exception(Pkcs11Error(ckr.KEY_HANDLE_INVALID))
        await _settle()
        assert isinstance(first.exception(), Pkcs11Error)
        share.submit("uid:A", 3, [])
        assert [c for c, _ in b.sent] == [1, 3]

    asyncio.run(main())


class FakePool(FakeBackend):
    """Tells calls apart by their first argument (pools count generations only)."""

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        return super().submit(args[0] if call_id == GEN else -call_id, args)


def test_a_pool_share_counts_generations_and_follows_its_usable_members() -> None:
    async def main() -> None:
        b = FakePool()
        live = [2]  # e.g. one member of share 2 usable
        share = FairShare(b, limit=1, max_queued=8, pool_limit=lambda: live[0])
        calls = [share.submit("uid:A", GEN, [i]) for i in range(5)]
        assert [c for c, _ in b.sent] == [0, 1]
        # other calls are not counted on a pool: an operation's C_Sign must never wait
        # behind C_SignInit calls that wait inside the pool for a member session
        share.submit("uid:A", C_SIGN, [7])
        assert [c for c, _ in b.sent] == [0, 1, -C_SIGN]
        live[0] = 4  # a second member came back: the queued calls go before new ones
        late = share.submit("uid:A", GEN, [9])
        assert share.waiting("uid:A") == 4
        b.finish(0)
        await _settle()
        assert [c for c, _ in b.sent] == [0, 1, -C_SIGN, 2, 3, 4]
        live[0] = 1  # members went down: nothing new starts until A is below the share
        b.finish(1)
        b.finish(2)
        await _settle()
        assert len(b.sent) == 6 and not late.done()
        b.finish(3)
        b.finish(4)
        await _settle()
        assert [c for c, _ in b.sent][-1] == 9
        assert all(f.done() for f in calls)

    asyncio.run(main())


def test_generations_never_take_the_last_thread() -> None:
    """threads = 4: two identities at their share of generations (3 each) run 3 in all;
    a third identity's signature goes straight on; a generation's end starts the
    next queued one, of either identity, in turn."""
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=3, max_queued=8, threads=4)
        a = [share.submit("uid:A", GEN, []) for _ in range(3)]
        c = [share.submit("uid:C", GEN, []) for _ in range(3)]
        assert [x for x, _ in b.sent] == [GEN] * 3  # A's three: the generations' places
        assert share.waiting("uid:C") == 3 and share.in_flight("uid:C") == 0
        sign = share.submit("uid:B", C_SIGN, [])
        assert [x for x, _ in b.sent] == [GEN] * 3 + [C_SIGN]  # B is not behind them
        b.finish(C_SIGN)
        await _settle()
        assert sign.result() == [C_SIGN]
        b.finish(GEN)  # one of A's ends: the place goes to a queued generation (C's)
        await _settle()
        assert share.in_flight("uid:C") == 1 and share.in_flight("uid:A") == 2
        assert sum(1 for x, f in b.sent if x == GEN and not f.done()) == 3
        for _ in range(5):
            b.finish(GEN)
            await _settle()
        assert all(f.done() for f in a + c)
        assert share.in_flight("uid:A") == share.in_flight("uid:C") == 0

    asyncio.run(main())


def test_all_identities_together_have_at_most_threads_calls_in_flight() -> None:
    """threads = 4, share 3: A and C at their share fill the backend; the rest wait.
    A bystander's call (nothing in flight) takes the next free place; then the queued
    identities take turns. submit_raw counts and yields the same way."""
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=3, max_queued=16, threads=4)
        a = [share.submit("uid:A", 100 + i, []) for i in range(5)]
        c = [share.submit("uid:C", 200 + i, []) for i in range(5)]
        assert [x for x, _ in b.sent] == [100, 101, 102, 200]  # 4 in all
        assert share.total_in_flight == 4 and share.waiting("uid:C") == 4
        # the raw relay path neither passes a full backend nor a queued identity
        assert share.submit_raw("uid:B", 300, []) is None and b.raw == []
        sign = share.submit("uid:B", C_SIGN, [])
        assert share.waiting("uid:B") == 1
        b.finish(100)  # the freed place goes to B (nothing in flight), not A or C
        await _settle()
        assert [x for x, _ in b.sent][4:] == [C_SIGN]
        b.finish(C_SIGN)  # then C and A take turns
        await _settle()
        b.finish(101)
        await _settle()
        b.finish(200)
        await _settle()
        # A was queued before C: A, C, A in turn (each under its share again)
        assert [x for x, _ in b.sent][5:] == [103, 201, 104]
        assert sign.result() == [C_SIGN] and share.total_in_flight == 4
        described = share.describe()
        assert described["max_calls_in_flight"] == 4 and described["in_flight_total"] == 4
        assert described["saturated_total"] >= 1
        for x in (102, 201):  # only C waits now: its calls take the places
            b.finish(x)
            await _settle()
        assert [x for x, _ in b.sent][8:] == [202, 203]
        for x in (103, 104, 202):
            b.finish(x)
            await _settle()
        left = [x for x, f in b.sent if not f.done()]
        assert sorted(left) == [203, 204] and share.total_in_flight == 2
        share.submit("uid:A", 105, [])  # in flight: 3
        # below capacity again with nobody queued behind it: the raw path is taken
        raw = share.submit_raw("uid:B", 301, [])
        assert raw is not None and b.raw == [301] and share.total_in_flight == 4
        assert share.submit_raw("uid:D", 302, []) is None  # full again
        raw.set_result(b"")
        await _settle()
        for x in (105, 203, 204):
            b.finish(x)
            await _settle()
        assert all(f.done() for f in a + c)
        assert share.total_in_flight == 0 and share.describe()["waiting"] == {}
        assert share.in_flight("uid:A") == share.in_flight("uid:B") == 0

    asyncio.run(main())


def test_round_robin_among_busy_identities_and_cancelled_or_dropped_calls() -> None:
    """threads = 2, share 2: three identities with calls in flight queue behind each
    other; each freed place goes to the next identity in turn. A cancelled call or one
    of a client that hung up gives its turn on at once."""
    async def main() -> None:
        b = FakeBackend()
        share = FairShare(b, limit=2, max_queued=16, threads=2)
        gone = Conn()
        share.submit("uid:A", 1, [])
        share.submit("uid:B", 2, [])
        for i in range(3):
            share.submit("uid:A", 10 + i, [])
            share.submit("uid:B", 20 + i, [], gone if i == 0 else None)
        assert [x for x, _ in b.sent] == [1, 2]
        cancelled = share.submit("uid:C", 30, [])
        share.submit("uid:C", 31, [])
        cancelled.cancel()
        assert share.drop_queued(gone) == 1
        b.finish(1)
        b.finish(2)
        await _settle()
        b.finish(10)
        await _settle()
        b.finish(21)
        await _settle()
        b.finish(31)
        await _settle()
        # C had nothing in flight: first; its first call was cancelled, its second one
        # takes its turn. Then A and B (both queued with a call in flight) in turn;
        # B's first call was dropped with its client
        assert [x for x, _ in b.sent] == [1, 2, 31, 10, 21, 11, 22]
        assert share.total_in_flight == 2

    asyncio.run(main())

"""The pool's direct path (backends/pool/direct.py): calls that need one member session
for one call (C_GenerateRandom, C_GetAttributeValue, ...) start without a task when an
idle member session and the member's handles are at hand, and the answers the pool
keeps (a find's results) come without one. Each test checks the same outcome the
general path gives: the reply, the lease given back, the member's bookkeeping, and
failover when a member fails under the call. Members here are fakes (routing logic);
tests/pools runs the same paths against real SoftHSM workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from p11gate.backends.pool.config import MemberConfig, PoolConfig
from p11gate.backends.pool.member import ID
from p11gate.backends.pool.pool import PoolBackend
from p11gate.backends.pool.routes import ANSWERED_HERE, DIRECT
from p11gate.codec import ckr, encode_error, encode_reply, reply_rv
from p11gate.codec import constants as ck
from p11gate.codec.calls import CALLS
from p11gate.codec.tables import V026
from p11gate.errors import BackendUnavailable, Pkcs11Error
from p11gate.registry import Registry

RANDOM = ID["C_GenerateRandom"]


class _Module:
    """A member's module: counts calls, opens numbered sessions, answers
    C_GenerateRandom with its own name, and fails a call with what ``fail`` gives."""

    def __init__(self, name: str) -> None:
        self.name, self.up, self.generation = name, True, 1
        self.raw_parameter_mechanisms: frozenset[int] = frozenset()
        self.calls: list[tuple[int, list[Any]]] = []
        self.fail: dict[int, Callable[[], BaseException]] = {}
        self.sessions = iter(range(100, 1000))
        self.sync_fail: BaseException | None = None
        self.relays_nothing = False

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        self.calls.append((call_id, list(args)))
        await asyncio.sleep(0)
        make = self.fail.get(call_id)
        if make is not None:
            raise make()
        if call_id == ID["C_OpenSession"]:
            return [next(self.sessions)]
        if call_id == RANDOM:
            return [self.name.encode()]
        if call_id == ID["C_FindObjects"]:
            return [[]]  # no object of that identity here
        return []

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        if self.sync_fail is not None:
            raise self.sync_fail
        return asyncio.ensure_future(self.call(call_id, args))

    def submit_raw(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes] | None:
        """As a worker relays: the reply body, module errors as an ERROR body."""
        if self.relays_nothing:
            return None
        if self.sync_fail is not None:
            raise self.sync_fail

        async def body() -> bytes:
            try:
                values = await self.call(call_id, args)
            except Pkcs11Error as e:
                return encode_error(e.rv)
            return encode_reply(call_id, values, V026)

        return asyncio.ensure_future(body())

    def count(self, name: str) -> int:
        return sum(1 for c, _ in self.calls if c == ID[name])


def _pool(tmp_path: Path, max_attempts: int = 3) -> tuple[PoolBackend, list[_Module]]:
    cfg = PoolConfig(name="ha", members=[MemberConfig(backend="m0"),
                                         MemberConfig(backend="m1")],
                     max_attempts=max_attempts)
    mods = [_Module(n) for n in ("m0", "m1")]
    pool = PoolBackend(cfg, cast(Any, {t.name: t for t in mods}), Registry(tmp_path))
    for m in pool.members:  # attached, each with one idle session leased before
        m.state, m.attached_generation, m.control, m.slot = "up", 1, 1, 0
        m.idle, m.open = [10 + m.index], 1
    pool.members[1].latency = 1.0  # m0 is the best member: asked first
    return pool, mods


async def _session(pool: PoolBackend) -> int:
    (h,) = await pool.call(ID["C_OpenSession"], [0, ck.CKF_SERIAL_SESSION])
    return int(h)


def test_the_direct_calls_are_the_one_call_session_calls() -> None:
    names = {CALLS[c].name for c in DIRECT}
    assert names == {"C_GenerateRandom", "C_SeedRandom", "C_GetAttributeValue",
                     "C_GetObjectSize", "C_GetSessionInfo"}
    assert {CALLS[c].name for c in ANSWERED_HERE} == {
        "C_GetSlotList", "C_FindObjects", "C_FindObjectsFinal"}


def test_a_random_with_an_idle_session_starts_without_a_task(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit(RANDOM, [h, 4])
        assert not isinstance(fut, asyncio.Task)  # the direct path
        assert await fut == [b"m0"]
        m0 = pool.members[0]
        # the module got the member's own session, and the lease is back
        assert mods[0].calls[-1] == (RANDOM, [10, 4])
        assert m0.idle == [10] and m0.leased == 0 and m0.outstanding == 0
        assert m0.calls == 1

    asyncio.run(go())


def test_without_an_idle_session_the_general_path_opens_one(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    pool.members[0].idle = []

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit(RANDOM, [h, 4])
        assert isinstance(fut, asyncio.Task)
        assert await fut == [b"m0"]
        assert mods[0].count("C_OpenSession") == 1
        assert pool.members[0].idle == [100]

    asyncio.run(go())


def test_an_unknown_logical_session_takes_the_general_path_and_its_error(
        tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)

    async def go() -> None:
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(RANDOM, [77, 4])
        assert e.value.rv == ckr.SESSION_HANDLE_INVALID
        assert not mods[0].calls and not mods[1].calls

    asyncio.run(go())


def test_a_member_failing_under_a_direct_call_fails_over(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: BackendUnavailable("worker died")

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit(RANDOM, [h, 4])
        assert not isinstance(fut, asyncio.Task)
        assert await fut == [b"m1"]  # the client never sees the failure
        m0, m1 = pool.members
        assert not m0.usable and m0.down_reason.startswith("transport")
        assert m0.open == 0 and m0.leased == 0  # its session dropped with it
        assert pool.failovers == 1 and m0.failovers == 1
        assert m1.idle == [11] and m1.leased == 0
        await asyncio.sleep(0.01)
        assert not pool._background  # follow-ups done

    asyncio.run(go())


def test_a_member_refusing_the_call_at_once_fails_over(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].sync_fail = BackendUnavailable("restarting")

    async def go() -> None:
        h = await _session(pool)
        assert await pool.submit(RANDOM, [h, 4]) == [b"m1"]
        assert not pool.members[0].usable and pool.failovers == 1

    asyncio.run(go())


def test_every_member_failing_ends_after_max_attempts(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path, max_attempts=2)
    for mod in mods:
        mod.fail[RANDOM] = lambda: BackendUnavailable("worker died")

    async def go() -> None:
        h = await _session(pool)
        with pytest.raises(BackendUnavailable) as e:
            await pool.submit(RANDOM, [h, 4])
        assert "failed on 2 members" in str(e.value)

    asyncio.run(go())


def test_one_attempt_only_is_not_retried(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path, max_attempts=1)
    mods[0].fail[RANDOM] = lambda: BackendUnavailable("worker died")

    async def go() -> None:
        h = await _session(pool)
        with pytest.raises(BackendUnavailable):
            await pool.submit(RANDOM, [h, 4])
        assert mods[1].count("C_GenerateRandom") == 0

    asyncio.run(go())


def test_a_module_error_is_the_answer_and_the_member_stays(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: Pkcs11Error(ckr.RANDOM_NO_RNG)

    async def go() -> None:
        h = await _session(pool)
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(RANDOM, [h, 4])
        assert e.value.rv == ckr.RANDOM_NO_RNG
        m0 = pool.members[0]
        assert m0.usable and m0.idle == [10] and pool.failovers == 0
        assert mods[1].count("C_GenerateRandom") == 0  # a request error: not retried

    asyncio.run(go())


def test_a_member_session_the_module_lost_is_replaced(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: Pkcs11Error(ckr.SESSION_HANDLE_INVALID)

    async def go() -> None:
        h = await _session(pool)
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(RANDOM, [h, 4])
        assert e.value.rv == ckr.SESSION_HANDLE_INVALID
        m0 = pool.members[0]
        assert m0.usable and m0.idle == [] and m0.open == 0  # never leased again
        await asyncio.sleep(0.01)
        assert (ID["C_CloseSession"], [10]) in mods[0].calls  # and closed

    asyncio.run(go())


def test_a_device_error_takes_the_member_down_and_fails_over(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: Pkcs11Error(ckr.DEVICE_ERROR)

    async def go() -> None:
        h = await _session(pool)
        assert await pool.submit(RANDOM, [h, 4]) == [b"m1"]
        assert pool.members[0].down_reason == "device: CKR_DEVICE_ERROR"

    asyncio.run(go())


def test_an_object_whose_handle_is_not_known_takes_the_general_path(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    key = (ck.CKO_PRIVATE_KEY, b"\x01", b"k", None)
    oid = pool.objects.token_oid(key)
    get = ID["C_GetAttributeValue"]

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit(get, [h, oid, []])
        assert isinstance(fut, asyncio.Task)  # a lookup on the member first
        with pytest.raises(Pkcs11Error) as e:
            await fut
        assert e.value.rv == ckr.OBJECT_HANDLE_INVALID  # on neither member
        assert [m.count("C_FindObjectsInit") for m in mods] == [1, 1]
        pool.members[0].handles[oid] = 55  # now known: direct, with the member's handle
        fut = pool.submit(get, [h, oid, []])
        assert not isinstance(fut, asyncio.Task)
        await fut
        assert mods[0].calls[-1] == (get, [10, 55, []])

    asyncio.run(go())


def test_an_id_naming_no_object_gets_object_handle_invalid(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)

    async def go() -> None:
        h = await _session(pool)
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(ID["C_GetAttributeValue"], [h, 4242, []])
        assert e.value.rv == ckr.OBJECT_HANDLE_INVALID
        assert not any(c == ID["C_GetAttributeValue"] for m in mods for c, _ in m.calls)

    asyncio.run(go())


def test_find_results_are_answered_without_a_task(tmp_path: Path) -> None:
    pool, _ = _pool(tmp_path)
    find, final = ID["C_FindObjects"], ID["C_FindObjectsFinal"]

    async def go() -> None:
        h = await _session(pool)
        for call_id, args in ((find, [h, 4]), (final, [h])):
            fut = pool.submit(call_id, args)
            assert not isinstance(fut, asyncio.Task)
            with pytest.raises(Pkcs11Error) as e:
                await fut
            assert e.value.rv == ckr.OPERATION_NOT_INITIALIZED
        pool.sessions[h].find = [1, 2, 3]
        assert await pool.submit(find, [h, 2]) == [[1, 2]]
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(find, [h, 0])
        assert e.value.rv == ckr.ARGUMENTS_BAD
        assert await pool.submit(find, [h, 2]) == [[3]]
        assert await pool.submit(final, [h]) == []
        assert pool.sessions[h].find is None
        with pytest.raises(Pkcs11Error) as e:
            await pool.submit(find, [999, 2])
        assert e.value.rv == ckr.SESSION_HANDLE_INVALID
        assert await pool.submit(ID["C_GetSlotList"], [1, 4]) == [[0]]

    asyncio.run(go())


def test_consecutive_direct_calls_spread_over_equal_members(tmp_path: Path) -> None:
    pool, _ = _pool(tmp_path)
    pool.members[1].latency = pool.members[0].latency

    async def go() -> None:
        h = await _session(pool)
        got = [await pool.submit(RANDOM, [h, 4]) for _ in range(6)]
        assert {r[0] for r in got} == {b"m0", b"m1"}

    asyncio.run(go())


def _body(name: str) -> bytes:
    return encode_reply(RANDOM, [name.encode()], V026)


def test_a_relayed_random_is_the_members_reply_bytes(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit_raw(RANDOM, [h, 4])
        assert fut is not None and await fut == _body("m0")
        assert mods[0].calls[-1] == (RANDOM, [10, 4])
        assert pool.members[0].idle == [10] and pool.members[0].calls == 1
        # not relayable (attributes are encoded per dialect): the decoded path only
        assert pool.submit_raw(ID["C_GetAttributeValue"], [h, 1, []]) is None

    asyncio.run(go())


def test_a_back_end_that_relays_nothing_gives_the_lease_back(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].relays_nothing = True

    async def go() -> None:
        h = await _session(pool)
        assert pool.submit_raw(RANDOM, [h, 4]) is None
        m0 = pool.members[0]
        assert m0.idle == [10] and m0.leased == 0 and not mods[0].calls[1:]

    asyncio.run(go())


@pytest.mark.parametrize("failure", [lambda: BackendUnavailable("worker died"),
                                     lambda: Pkcs11Error(ckr.DEVICE_ERROR)])
def test_a_relayed_call_fails_over_to_the_next_member(
        tmp_path: Path, failure: Callable[[], BaseException]) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = failure

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit_raw(RANDOM, [h, 4])
        assert fut is not None
        assert await fut == _body("m1")  # encoded from the general path's values
        assert not pool.members[0].usable and pool.failovers == 1
        assert pool.members[0].open == 0

    asyncio.run(go())


def test_a_relayed_module_error_is_the_reply(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: Pkcs11Error(ckr.RANDOM_NO_RNG)

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit_raw(RANDOM, [h, 4])
        assert fut is not None and reply_rv(await fut) == ckr.RANDOM_NO_RNG
        m0 = pool.members[0]
        assert m0.usable and m0.idle == [10] and m0.calls == 0  # not an answer in time
        assert mods[1].count("C_GenerateRandom") == 0

    asyncio.run(go())


def test_a_relayed_lost_session_is_replaced(tmp_path: Path) -> None:
    pool, mods = _pool(tmp_path)
    mods[0].fail[RANDOM] = lambda: Pkcs11Error(ckr.SESSION_HANDLE_INVALID)

    async def go() -> None:
        h = await _session(pool)
        fut = pool.submit_raw(RANDOM, [h, 4])
        assert fut is not None and reply_rv(await fut) == ckr.SESSION_HANDLE_INVALID
        m0 = pool.members[0]
        assert m0.usable and m0.idle == [] and m0.open == 0
        await asyncio.sleep(0.01)
        assert (ID["C_CloseSession"], [10]) in mods[0].calls

    asyncio.run(go())

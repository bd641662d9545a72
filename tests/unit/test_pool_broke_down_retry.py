"""A slot query or a login that breaks down inside a member's module (CKR_GENERAL_ERROR)
is asked again -- on another member first, for a query -- instead of reaching the client
(the CI flake of two nodes generating at once that the creation retry did not cover:
SoftHSM's file store, rewritten by the other node's worker, failed one client's
C_GetTokenInfo before it logged in). The failures are forced here; a member that keeps
failing gives the client the module's answer after the last attempt, and other errors
are answered at once, as before."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from p11gate.backends.pool.config import MemberConfig, PoolConfig
from p11gate.backends.pool.member_rules import BROKE_DOWN_ATTEMPTS, ID
from p11gate.backends.pool.pool import PoolBackend
from p11gate.codec import ckr
from p11gate.codec import constants as ck
from p11gate.errors import Pkcs11Error
from p11gate.registry import Registry

INFO = ["token info"]


class _Token:
    """A member's module whose calls fail with the errors queued for them (one per
    call, then for ever with the last if ``keep`` is set), and answer ``INFO`` else."""

    def __init__(self, name: str) -> None:
        self.name, self.up, self.generation = name, True, 1
        self.raw_parameter_mechanisms: frozenset[int] = frozenset()
        self.calls: list[int] = []
        self.fail: dict[int, list[int]] = {}
        self.keep = False

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        self.calls.append(call_id)
        queued = self.fail.get(call_id)
        if queued:
            raise Pkcs11Error(queued[0] if self.keep else queued.pop(0))
        return INFO if call_id == ID["C_GetTokenInfo"] else []


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("p11gate.backends.pool.pool_wide_calls.BROKE_DOWN_PAUSE", 0.0)


def _pool(tmp_path: Path) -> tuple[PoolBackend, list[_Token]]:
    cfg = PoolConfig(name="ha", members=[MemberConfig(backend="m0"),
                                         MemberConfig(backend="m1")])
    tokens = [_Token(n) for n in ("m0", "m1")]
    pool = PoolBackend(cfg, cast(Any, {t.name: t for t in tokens}), Registry(tmp_path))
    for m in pool.members:  # attached, not logged in: as a client finds it
        m.state, m.attached_generation, m.control, m.slot = "up", 1, 1, 0
    return pool, tokens


def _count(token: _Token, name: str) -> int:
    return token.calls.count(ID[name])


def test_token_info_that_broke_down_on_a_member_comes_from_another(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    pool.members[1].latency = 1.0  # m0 is the best member: asked first
    tokens[0].fail[ID["C_GetTokenInfo"]] = [ckr.GENERAL_ERROR]
    assert asyncio.run(pool.call(ID["C_GetTokenInfo"], [0])) == INFO
    assert [_count(t, "C_GetTokenInfo") for t in tokens] == [1, 1]  # no pause, no round 2
    assert all(m.usable for m in pool.members)  # not a member fault: nobody taken down


def test_token_info_is_asked_again_when_every_member_broke_down(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    for t in tokens:
        t.fail[ID["C_GetTokenInfo"]] = [ckr.GENERAL_ERROR, ckr.GENERAL_ERROR]
    # round 1: both fail; round 2: both fail; round 3: the first asked answers
    assert asyncio.run(pool.call(ID["C_GetTokenInfo"], [0])) == INFO
    assert sum(_count(t, "C_GetTokenInfo") for t in tokens) == 5


def test_a_query_that_keeps_breaking_down_gets_the_modules_answer(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    for t in tokens:
        t.fail[ID["C_GetTokenInfo"]], t.keep = [ckr.GENERAL_ERROR], True
    with pytest.raises(Pkcs11Error) as e:
        asyncio.run(pool.call(ID["C_GetTokenInfo"], [0]))
    assert e.value.rv == ckr.GENERAL_ERROR
    assert [_count(t, "C_GetTokenInfo") for t in tokens] == [BROKE_DOWN_ATTEMPTS] * 2
    assert all(m.usable for m in pool.members)


@pytest.mark.parametrize("rv", [ckr.MECHANISM_INVALID, ckr.FUNCTION_FAILED])
def test_other_query_errors_are_answered_at_once(tmp_path: Path, rv: int) -> None:
    pool, tokens = _pool(tmp_path)
    for t in tokens:
        t.fail[ID["C_GetMechanismInfo"]] = [rv]
    with pytest.raises(Pkcs11Error) as e:
        asyncio.run(pool.call(ID["C_GetMechanismInfo"], [0, ck.CKM_ECDSA]))
    assert e.value.rv == rv
    assert sum(_count(t, "C_GetMechanismInfo") for t in tokens) == 1


def _login(pool: PoolBackend, pin: bytes = b"1234") -> list[Any]:
    async def go() -> list[Any]:
        (h,) = await pool.call(ID["C_OpenSession"], [0, ck.CKF_SERIAL_SESSION])
        return await pool.call(ID["C_Login"], [h, ck.CKU_USER, pin])

    return asyncio.run(go())


def test_a_login_that_broke_down_on_a_member_is_tried_again_there(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    tokens[0].fail[ID["C_Login"]] = [ckr.GENERAL_ERROR, ckr.GENERAL_ERROR]
    assert _login(pool) == []
    assert [_count(t, "C_Login") for t in tokens] == [3, 1]
    # both members logged in and serving: the breakdown did not count as a refusal
    assert all(m.usable for m in pool.members) and pool.logged_in


def test_a_member_whose_login_keeps_breaking_down_is_left_out(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    tokens[0].fail[ID["C_Login"]], tokens[0].keep = [ckr.GENERAL_ERROR], True
    assert _login(pool) == []  # the other member took the PIN
    assert [_count(t, "C_Login") for t in tokens] == [BROKE_DOWN_ATTEMPTS, 1]
    assert not pool.members[0].usable and pool.members[1].usable  # as before: its probe
    # logs it in again


def test_a_login_every_member_keeps_refusing_so_gets_the_modules_answer(
    tmp_path: Path,
) -> None:
    pool, tokens = _pool(tmp_path)
    for t in tokens:
        t.fail[ID["C_Login"]], t.keep = [ckr.GENERAL_ERROR], True
    with pytest.raises(Pkcs11Error) as e:
        _login(pool)
    assert e.value.rv == ckr.GENERAL_ERROR and not pool.logged_in
    assert [_count(t, "C_Login") for t in tokens] == [BROKE_DOWN_ATTEMPTS] * 2


def test_a_wrong_pin_is_not_tried_again(tmp_path: Path) -> None:
    pool, tokens = _pool(tmp_path)
    for t in tokens:
        t.fail[ID["C_Login"]] = [ckr.PIN_INCORRECT]
    with pytest.raises(Pkcs11Error) as e:
        _login(pool, b"0000")
    assert e.value.rv == ckr.PIN_INCORRECT
    assert [_count(t, "C_Login") for t in tokens] == [1, 1]  # one wrong PIN each, no more

"""Review 2026-12-07: a session closed on the module under a call still running on it.

C_CloseAllSessions and C_Finalize are session-less calls, and a connection's close is no
call at all: none of them waited for the calls in flight on the sessions they close. A
client that pipelined ``C_Digest(1 MB)`` and ``C_CloseAllSessions`` made the gateway
send ``C_CloseSession`` while SoftHSM was still hashing on that session; SoftHSM freed
the session's digest under the running call and crashed. With ``isolation = "process"``
the worker died (every tenant's sessions on that back end with it: CKR_DEVICE_ERROR,
CKR_SESSION_HANDLE_INVALID for a bystander); in-process the gateway itself died. The
same path let a call queued behind the identity's fair share start on a backend session
number closed meanwhile (a module that reuses session numbers gives it to the next
application that opens one). A logout ended the private-key operations of the
connection's other sessions the same way (C_SignFinal under a running C_Sign). Now a
session leaves the connection's table first and is closed on the module only when its
calls have ended, and a logout fences an operation at once but ends it on the module
only after the calls already sent in it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_LABEL,
    CKF_SERIAL,
    CKM_SHA256,
    CKO_PRIVATE_KEY,
    CKU_USER,
    call,
    pipeline,
    rv,
    s,
    send,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient, worker_pids, write_config
from tests.policy.tenants import raw, slot_of
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr

#: big enough that SoftHSM is still hashing when the close arrives, under max_frame
DATA = b"\x01" * 1_000_000
ROUNDS = 8
CKM_SHA256_RSA_PKCS = 0x40


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module", params=["process", "none"])
def gw(request: pytest.FixtureRequest, token: dict,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base: Path = tmp_path_factory.mktemp(f"close-{request.param}")
    g = Gateway(write_config(base, token, isolation=request.param))
    yield g
    stop_gateway(g)


def _digesting(c: RawClient, slot: int) -> int:
    (h,) = call(c, "C_OpenSession", slot, CKF_SERIAL)
    call(c, "C_DigestInit", h, Mechanism(CKM_SHA256, None))
    return int(h)


def _bystander(gw: Gateway) -> tuple[RawClient, int]:
    by = raw(gw.path)
    (h,) = call(by, "C_OpenSession", slot_of(by, "signing"), CKF_SERIAL)
    return by, int(h)


def _unharmed(gw: Gateway, by: RawClient, h: int, workers: list[int]) -> None:
    assert gw.alive(), gw.log()[-3000:]
    # the bystander's session survived: no worker restart took it
    assert rv(by, "C_GenerateRandom", h, 16) == ckr.OK
    assert worker_pids(gw) == workers
    assert not [r for r in gw.records() if r.get("msg") == "backend down"]


def test_close_all_sessions_waits_for_the_call_on_the_session(gw: Gateway) -> None:
    by, bh = _bystander(gw)
    workers = worker_pids(gw)
    c = raw(gw.path)
    slot = slot_of(c, "signing")
    for _ in range(ROUNDS):
        h = _digesting(c, slot)
        codes = pipeline(c, [("C_Digest", [h, DATA, 32]), ("C_CloseAllSessions", [slot])])
        # the digest ran to its end on its session; then the session was closed
        assert codes == [ckr.OK, ckr.OK]
        assert rv(c, "C_GetSessionInfo", h) == ckr.SESSION_HANDLE_INVALID
    c.close()
    _unharmed(gw, by, bh, workers)
    by.close()


def test_finalize_waits_for_the_call_on_the_session(gw: Gateway) -> None:
    by, bh = _bystander(gw)
    workers = worker_pids(gw)
    c = raw(gw.path)
    slot = slot_of(c, "signing")
    for _ in range(ROUNDS):
        h = _digesting(c, slot)
        assert pipeline(c, [("C_Digest", [h, DATA, 32]), ("C_Finalize", [])]) == [0, 0]
        c.initialize()
    c.close()
    _unharmed(gw, by, bh, workers)
    by.close()


def test_hanging_up_during_a_call_closes_its_session_after_it(gw: Gateway) -> None:
    by, bh = _bystander(gw)
    workers = worker_pids(gw)
    for _ in range(ROUNDS):
        c = raw(gw.path)
        h = _digesting(c, slot_of(c, "signing"))
        send(c, "C_Digest", h, DATA, 32)
        c.sock.shutdown(socket.SHUT_WR)  # the whole frame is sent: then hang up
        c.recv_frame()
        c.close()
    _unharmed(gw, by, bh, workers)
    by.close()


def test_logout_ends_an_operation_only_after_the_call_in_it(gw: Gateway) -> None:
    by, bh = _bystander(gw)
    workers = worker_pids(gw)
    c = raw(gw.path)
    slot = slot_of(c, "signing")
    (x,) = call(c, "C_OpenSession", slot, CKF_SERIAL)
    (y,) = call(c, "C_OpenSession", slot, CKF_SERIAL)
    for _ in range(ROUNDS):
        call(c, "C_Login", x, CKU_USER, b"1234")
        (key,) = c.find(y, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "rsa1")])
        call(c, "C_SignInit", y, Mechanism(CKM_SHA256_RSA_PKCS, None), key)
        # a 1 MB signature on one session, the logout on the other
        codes = pipeline(c, [("C_Sign", [y, DATA, 256]), ("C_Logout", [x])])
        assert codes == [ckr.OK, ckr.OK]
    c.close()
    _unharmed(gw, by, bh, workers)
    by.close()

"""Login per connection over one shared backend login (issue: login semantics)."""

from __future__ import annotations

import time

import pytest
from tests.gateway_proc import Gateway, RawClient, rv_of

from p11gate.codec import Attribute, Mechanism, ckr

CKU_SO, CKU_USER = 0, 1
C_GetSlotList, C_OpenSession, C_CloseSession, C_GetSessionInfo = 4, 10, 11, 13
C_Login, C_Logout = 18, 19
C_SignInit, C_Sign, C_CreateObject, C_GenerateKey = 42, 43, 20, 58
CKO_PRIVATE_KEY = 3


def session(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 8])
    (s,) = c.call(C_OpenSession, [slots[0], 6])
    return c, s


def find(c: RawClient, s: int, template: list[Attribute]) -> list[int]:
    return c.find(s, template, 32)


PRIVATE_KEYS = [Attribute(0, CKO_PRIVATE_KEY, 8)]


def test_login_state_is_per_connection(gateway: Gateway) -> None:
    a, sa = session(gateway)
    b, sb = session(gateway)
    assert a.call(C_Login, [sa, CKU_USER, b"1234"]) == []
    keys_a = find(a, sa, PRIVATE_KEYS)
    assert len(keys_a) == 2
    # b shares the backend but is not logged in: public state, no private objects
    assert b.call(C_GetSessionInfo, [sb])[1] == 2  # CKS_RW_PUBLIC_SESSION
    assert a.call(C_GetSessionInfo, [sa])[1] == 3  # CKS_RW_USER_FUNCTIONS
    assert find(b, sb, PRIVATE_KEYS) == []
    assert find(b, sb, [Attribute(2, 1, 1)]) == []  # asking for CKA_PRIVATE=TRUE
    assert len(find(b, sb, [])) >= 2  # public keys are visible
    # b cannot use a's handle, nor guess one
    for h in [*keys_a, *range(1, 40)]:
        if h in find(b, sb, []):
            continue
        assert rv_of(b, C_SignInit, [sb, Mechanism(0x1041, None), h]) in (
            ckr.OBJECT_HANDLE_INVALID, ckr.KEY_HANDLE_INVALID)
    # b may not create private objects while the backend is logged in for a
    secret = [Attribute(0, 4, 8), Attribute(0x100, 0x1F, 8), Attribute(0x161, 16, 8),
              Attribute(1, 0, 1)]
    assert rv_of(b, C_GenerateKey, [sb, Mechanism(0x1080, None), secret]) == \
        ckr.USER_NOT_LOGGED_IN
    # a wrong PIN on the second login is refused, the right one accepted
    assert rv_of(b, C_Login, [sb, CKU_USER, b"9999"]) == ckr.PIN_INCORRECT
    assert rv_of(b, C_Login, [sb, CKU_USER, b"1234"]) == ckr.OK
    assert rv_of(b, C_Login, [sb, CKU_USER, b"1234"]) == ckr.USER_ALREADY_LOGGED_IN
    assert len(find(b, sb, PRIVATE_KEYS)) == 2
    # an SO login is excluded while users are logged in
    assert rv_of(b, C_Login, [sb, CKU_SO, b"5678"]) == ckr.USER_ANOTHER_ALREADY_LOGGED_IN
    # b logs out: its private handles are gone, a keeps working
    keys_b = find(b, sb, PRIVATE_KEYS)
    assert b.call(C_Logout, [sb]) == []
    assert rv_of(b, C_SignInit, [sb, Mechanism(0x1041, None), keys_b[0]]) in (
        ckr.OBJECT_HANDLE_INVALID, ckr.KEY_HANDLE_INVALID)
    assert rv_of(b, C_Logout, [sb]) == ckr.USER_NOT_LOGGED_IN
    assert find(b, sb, PRIVATE_KEYS) == []
    (ec,) = find(a, sa, [*PRIVATE_KEYS, Attribute(0x102, b"\x01", 1)])
    a.call(C_SignInit, [sa, Mechanism(0x1041, None), ec])
    (sig,) = a.call(C_Sign, [sa, b"\x01" * 32, 512])
    assert len(sig) == 64
    # the last logout logs the backend out: then a wrong PIN cannot be "verified"
    # against a stale hash, it goes to the backend and fails there
    assert a.call(C_Logout, [sa]) == []
    assert rv_of(b, C_Login, [sb, CKU_USER, b"9999"]) == ckr.PIN_INCORRECT
    assert rv_of(b, C_Login, [sb, CKU_USER, b"1234"]) == ckr.OK
    assert b.call(C_Logout, [sb]) == []
    a.close()
    b.close()


def test_closing_a_connection_logs_it_out(gateway: Gateway) -> None:
    a, sa = session(gateway)
    assert a.call(C_Login, [sa, CKU_USER, b"1234"]) == []
    a.close()  # no C_Logout, no C_Finalize: the gateway ends a's login by itself
    b, sb = session(gateway)
    for _ in range(50):  # the close is processed asynchronously
        if rv_of(b, C_Login, [sb, CKU_SO, b"5678"]) == ckr.OK:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the closed connection's user login was never dropped")
    assert b.call(C_GetSessionInfo, [sb])[1] == 4  # CKS_RW_SO_FUNCTIONS
    assert b.call(C_Logout, [sb]) == []
    b.close()

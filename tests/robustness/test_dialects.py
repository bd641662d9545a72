"""Clients of every p11-kit generation are served in their own dialect (SPEC §1.4, §11):
the version byte a client offers picks the mechanism encoding and the call ids."""

from __future__ import annotations

import pytest
from tests.gateway_proc import Gateway, RawClient

from p11gate.codec import V0241, V025, V026, Attribute, Dialect, Mechanism, ReplyError, ckr
from p11gate.codec.values import Ecdh1Params, ParamUpdate, PssParams

C_GetSlotList, C_OpenSession, C_Login, C_GetAttributeValue = 4, 10, 18, 24
C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 26, 27, 28
C_SignInit, C_Sign, C_DeriveKey, C_SessionCancel, C_DeriveKey2 = 42, 43, 62, 67, 89


def open_logged_in(gw: Gateway, version: int, dialect: Dialect) -> tuple[RawClient, int]:
    c = RawClient(gw.path, version=version, dialect=dialect)
    assert c.version == bytes([min(version, 2)])
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 8])
    (s,) = c.call(C_OpenSession, [slots[0], 6])
    try:
        c.call(C_Login, [s, 1, b"1234"])
    except ReplyError as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    return c, s


def key(c: RawClient, s: int, cls: int, kid: bytes) -> int:
    c.call(C_FindObjectsInit, [s, [Attribute(0, cls, 8), Attribute(0x102, kid, len(kid))]])
    (found,) = c.call(C_FindObjects, [s, 2])
    c.call(C_FindObjectsFinal, [s])
    assert len(found) == 1
    return int(found[0])


@pytest.mark.parametrize(("version", "dialect"), [(0, V0241), (1, V025), (2, V026), (9, V026)])
def test_sign_in_each_dialect(gateway: Gateway, version: int, dialect: Dialect) -> None:
    c, s = open_logged_in(gateway, version, dialect)
    ec = key(c, s, 3, b"\x01")
    c.call(C_SignInit, [s, Mechanism(0x1041, None), ec])  # bare type (new) or + ffffffff (old)
    (sig,) = c.call(C_Sign, [s, b"\x05" * 32, 64])
    assert len(sig) == 64
    rsa = key(c, s, 3, b"\x02")
    c.call(C_SignInit, [s, Mechanism(0xD, PssParams(0x250, 2, 32)), rsa])
    (sig,) = c.call(C_Sign, [s, b"\x06" * 32, 256])
    assert len(sig) == 256
    c.close()


def test_new_generation_calls(gateway: Gateway) -> None:
    c, s = open_logged_in(gateway, 2, V026)
    # a 3.0 call the backend (SoftHSM 2.6, PKCS#11 2.40) does not have
    with pytest.raises(ReplyError) as e:
        c.call(C_SessionCancel, [s, 0])
    assert e.value.rv == ckr.FUNCTION_NOT_SUPPORTED
    # C_DeriveKey2 with an ECDH1 parameter, derived against our own public key
    ec = key(c, s, 3, b"\x01")
    pub = key(c, s, 2, b"\x01")
    from p11gate.codec import AttrRequest

    (attrs, rv) = c.call(C_GetAttributeValue, [s, pub, [AttrRequest(0x181, 128)]])
    assert rv == ckr.OK
    point = attrs[0].value
    raw_point = point[2:] if point[0] == 0x04 and point[1] == len(point) - 2 else point
    template = [Attribute(0, 4, 8), Attribute(0x100, 0x10, 8), Attribute(0x161, 32, 8),
                Attribute(1, 0, 1)]
    reply = c.call(C_DeriveKey2, [s, Mechanism(0x1050, Ecdh1Params(1, None, raw_point)), ec,
                                  template])
    assert reply[0] == ckr.OK and reply[1] == ParamUpdate(True) and reply[2] > 0
    # and the old call id for the same thing
    (h,) = c.call(C_DeriveKey, [s, Mechanism(0x1050, Ecdh1Params(1, None, raw_point)), ec,
                               template])
    assert h > 0 and h != reply[2]
    c.close()

"""Raw RPC frames at a soft token behind a real gateway: duplicated attributes, huge
lengths, wrong handles, operations without init give PKCS#11 errors, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, RawClient, rv_of
from tests.soft.helpers import cid
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config

from p11gate.backends.soft.objects import BOOL_ATTRS
from p11gate.codec import ReplyError, ckr
from p11gate.codec.values import Attribute, AttrRequest, Mechanism

P256 = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture()
def gw(tmp_path: Path):  # type: ignore[no-untyped-def]
    g = Gateway(soft_gateway_config(tmp_path))
    yield g
    alive = g.alive()
    g.stop()
    assert alive, g.log()[-3000:]


def A(t: int, v: int | bytes) -> Attribute:
    if isinstance(v, int):
        return Attribute(t, v, 1 if t in BOOL_ATTRS else 8)
    return Attribute(t, v, len(v))


def test_hostile_requests_get_pkcs11_errors(gw: Gateway) -> None:
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = c.call(cid("C_GetSlotList"), [1, 8])
    slot = slots[0]
    (s,) = c.call(cid("C_OpenSession"), [slot, 6])
    c.call(cid("C_Login"), [s, 1, USER_PIN.encode()])
    pub, priv = c.call(cid("C_GenerateKeyPair"), [
        s, Mechanism(0x1040), [A(0x180, P256)], [A(0x102, b"h")]])
    bad = {
        "duplicate": rv_of(c, cid("C_CreateObject"), [s, [A(0, 0), A(3, b"a"), A(3, b"b")]]),
        "huge value": rv_of(c, cid("C_CreateObject"), [s, [A(0, 0), A(3, b"x" * 100_000)]]),
        "unavailable": rv_of(c, cid("C_CreateObject"), [s, [A(0, 0), Attribute(3, None, None)]]),
        "class out of range": rv_of(c, cid("C_CreateObject"), [s, [Attribute(0, 1 << 40, 8)]]),
        "wrong session": rv_of(c, cid("C_SignInit"), [s + 1000, Mechanism(0x1041), priv]),
        "wrong key": rv_of(c, cid("C_SignInit"), [s, Mechanism(0x1041), priv + 1000]),
        "sign without init": rv_of(c, cid("C_Sign"), [s, b"\1" * 32, 64]),
        "final without init": rv_of(c, cid("C_SignFinal"), [s, 64]),
        "verify without init": rv_of(c, cid("C_Verify"), [s, b"x", b"y"]),
        "find without init": rv_of(c, cid("C_FindObjects"), [s, 0xFFFFFFFF]),
        "rsa 2^30 bits": rv_of(c, cid("C_GenerateKeyPair"), [
            s, Mechanism(0x0), [Attribute(0x121, 1 << 30, 8)], []]),
        "aes huge": rv_of(c, cid("C_GenerateKey"), [s, Mechanism(0x1080),
                                                    [Attribute(0x161, 1 << 40, 8)]]),
        "unknown mechanism": rv_of(c, cid("C_SignInit"), [s, Mechanism(0x80001234), priv]),
        "ecdsa odd length": -1,
        "copy": rv_of(c, cid("C_CopyObject"), [s, priv, []]),
        "wrap": rv_of(c, cid("C_WrapKey"), [s, Mechanism(0x1085, b"\0" * 16), priv, pub, 64]),
    }
    c.call(cid("C_SignInit"), [s, Mechanism(0x1041), priv])
    bad["ecdsa odd length"] = rv_of(c, cid("C_Sign"), [s, b"\1" * 33, 64])
    assert all(rv != ckr.OK for rv in bad.values())
    assert bad["sign without init"] == ckr.OPERATION_NOT_INITIALIZED
    assert bad["ecdsa odd length"] == ckr.DATA_LEN_RANGE
    assert bad["rsa 2^30 bits"] in (ckr.KEY_SIZE_RANGE, ckr.TEMPLATE_INCONSISTENT)
    # a length field that lies: the value on the wire is what is stored
    (h,) = c.call(cid("C_CreateObject"), [s, [A(0, 0), Attribute(3, b"abc", 0xFFFFFFFF)]])
    attrs, rv = c.call(cid("C_GetAttributeValue"), [s, h, [AttrRequest(3, 0)]])
    assert rv == ckr.OK and attrs[0].length == 3
    # a huge random request: bounded by the gateway or refused by the token
    try:
        (rnd,) = c.call(cid("C_GenerateRandom"), [s, 0xFFFFFFF0])
        assert len(rnd) <= 1 << 24
    except ReplyError as e:
        assert e.rv in (ckr.DATA_LEN_RANGE, ckr.ARGUMENTS_BAD, ckr.DEVICE_MEMORY, ckr.HOST_MEMORY)
    # attribute requests with huge buffers: refused by the gateway (CKR_HOST_MEMORY) or
    # answered by the token; reasonable ones are answered
    assert rv_of(c, cid("C_GetAttributeValue"), [s, pub, [AttrRequest(0x181, 0xFFFFFFF)]]
                 ) in (ckr.OK, ckr.HOST_MEMORY)
    attrs, rv = c.call(cid("C_GetAttributeValue"), [s, pub, [AttrRequest(0x181, 4096),
                                                             AttrRequest(0x11, 4096)]])
    assert rv == ckr.ATTRIBUTE_TYPE_INVALID and attrs[0].value[:1] == b"\x04"
    attrs, rv = c.call(cid("C_GetAttributeValue"), [s, priv, [AttrRequest(0x11, 4096)]])
    assert rv == ckr.ATTRIBUTE_SENSITIVE
    # and the token still works
    c.call(cid("C_SignInit"), [s, Mechanism(0x1041), priv])
    (sig,) = c.call(cid("C_Sign"), [s, b"\1" * 32, 64])
    assert len(sig) == 64
    c.close()
    assert gw.alive()
    assert "Traceback" not in gw.log()

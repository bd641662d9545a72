"""Crafted mechanism parameters in raw RPC frames at a soft token behind a real gateway:
truncated OAEP parameters, GCM with huge tag and IV lengths, a CTR counter wider than
the block, ECDH with a point off the curve, absurd PSS/OAEP values. Each gets a PKCS#11
error (or, for a frame that does not parse, the connection closed) and the token keeps
working."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, RawClient, rv_of
from tests.soft.helpers import cid
from tests.soft.mech_driver import A
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config

from p11gate.codec import V0241, V026, build_frame, ckr, encode_request
from p11gate.codec.values import (
    CtrParams,
    Ecdh1Params,
    GcmParams,
    Mechanism,
    OaepParams,
    PssParams,
)

P256 = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture()
def gw(tmp_path: Path):  # type: ignore[no-untyped-def]
    g = Gateway(soft_gateway_config(tmp_path))
    yield g
    alive = g.alive()
    g.stop()
    assert alive, g.log()[-3000:]
    assert "Traceback" not in g.log()


def _session(gw: Gateway, dialect: object = V026, version: int = 2) -> tuple[RawClient, int]:
    c = RawClient(gw.path, version=version, dialect=dialect)  # type: ignore[arg-type]
    c.initialize()
    (slots,) = c.call(cid("C_GetSlotList"), [1, 8])
    (s,) = c.call(cid("C_OpenSession"), [slots[0], 6])
    rv = rv_of(c, cid("C_Login"), [s, 1, USER_PIN.encode()])
    assert rv in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    return c, s


def _keys(c: RawClient, s: int) -> dict[str, int]:
    (aes,) = c.call(cid("C_GenerateKey"), [s, Mechanism(0x1080), [
        A(0x161, 32), A(0x104, 1), A(0x105, 1)]])
    _pub, ec_priv = c.call(cid("C_GenerateKeyPair"), [
        s, Mechanism(0x1040), [A(0x180, P256)], [A(0x10C, 1)]])
    rsa_pub, rsa_priv = c.call(cid("C_GenerateKeyPair"), [
        s, Mechanism(0x0), [A(0x121, 2048), A(0x104, 1)], [A(0x105, 1)]])
    return {"aes": aes, "ec": ec_priv, "rsa_pub": rsa_pub, "rsa": rsa_priv}


def _truncated_oaep(c: RawClient, s: int, key: int) -> bytes:
    """C_EncryptInit whose mechanism says OAEP but carries 5 bytes: the reader of
    CK_RSA_PKCS_OAEP_PARAMS runs off the parameter into the key handle and the end."""
    def body(mtype: int) -> bytes:
        return encode_request(cid("C_EncryptInit"), [s, Mechanism(mtype, b"\1" * 5), key],
                              V0241)
    one, three = body(0x1), body(0x3)
    at = next(i for i in range(len(one)) if one[i] != three[i])
    crafted = one[:at] + bytes([0x09]) + one[at + 1:]
    return build_frame(0x77, crafted, b"client")


def test_crafted_mechanism_parameters(gw: Gateway) -> None:
    c, s = _session(gw)
    k = _keys(c, s)
    aes, iv = k["aes"], os.urandom(12)
    bad = {
        "gcm huge tag": (cid("C_EncryptInit"), [s, Mechanism(0x1087, GcmParams(
            iv, 96, None, 0xFFFFFFFFFFFF)), aes]),
        "gcm huge iv bits": (cid("C_EncryptInit"), [s, Mechanism(0x1087, GcmParams(
            iv, 1 << 62, None, 128)), aes]),
        "gcm 64 KiB iv": (cid("C_EncryptInit"), [s, Mechanism(0x1087, GcmParams(
            os.urandom(65536), 65536 * 8, None, 128)), aes]),
        "ctr 129 counter bits": (cid("C_EncryptInit"), [s, Mechanism(0x1086, CtrParams(
            129, bytes(16))), aes]),
        "ctr 2^64-1 counter bits": (cid("C_EncryptInit"), [s, Mechanism(0x1086, CtrParams(
            (1 << 64) - 1, bytes(16))), aes]),
        "ecdh off the curve": (cid("C_DeriveKey"), [s, Mechanism(0x1050, Ecdh1Params(
            1, None, b"\x04" + b"\x01" * 64)), k["ec"], [A(0, 4), A(0x100, 0x10),
                                                          A(0x161, 16)]]),
        "ecdh point of the wrong size": (cid("C_DeriveKey"), [s, Mechanism(
            0x1050, Ecdh1Params(1, None, b"\x04" * 7)), k["ec"], [A(0, 4), A(0x100, 0x10)]]),
        "oaep unknown hash": (cid("C_EncryptInit"), [s, Mechanism(0x9, OaepParams(
            (1 << 64) - 1, 2, 1, b"label")), k["rsa_pub"]]),
        "pss huge salt": (cid("C_SignInit"), [s, Mechanism(0xD, PssParams(
            0x250, 2, (1 << 64) - 1)), k["rsa"]]),
    }
    got = {why: rv_of(c, call, args) for why, (call, args) in bad.items()}
    for why, rv in got.items():
        assert rv in (ckr.MECHANISM_PARAM_INVALID, ckr.ARGUMENTS_BAD, ckr.HOST_MEMORY), \
            (why, hex(rv))
    assert got["ecdh off the curve"] == ckr.MECHANISM_PARAM_INVALID
    assert got["ctr 129 counter bits"] == ckr.MECHANISM_PARAM_INVALID
    assert got["gcm huge tag"] == ckr.MECHANISM_PARAM_INVALID
    # a truncated OAEP parameter (0.24 framing: the serializer reads past it)
    old, s_old = _session(gw, V0241, 0)
    old.send_raw(_truncated_oaep(old, s_old, _keys(old, s_old)["rsa_pub"]))
    frame = old.recv_frame()
    if frame is not None:  # answered: with an error, never a started operation
        assert frame[0] == 0x77
        assert rv_of(old, cid("C_EncryptFinal"), [s_old, 512]) \
            == ckr.OPERATION_NOT_INITIALIZED
    old.close()
    # and the token still works, on the first connection and on a new one
    c.call(cid("C_EncryptInit"), [s, Mechanism(0x1087, GcmParams(iv, 96, b"a", 128)), aes])
    (ct,) = c.call(cid("C_Encrypt"), [s, b"still working", 64])
    assert len(ct) == 13 + 16
    c.call(cid("C_SignInit"), [s, Mechanism(0x1041), k["ec"]])
    (sig,) = c.call(cid("C_Sign"), [s, b"\1" * 32, 64])
    assert len(sig) == 64
    c.close()
    c2, s2 = _session(gw)
    c2.call(cid("C_SignInit"), [s2, Mechanism(0x1041), _keys(c2, s2)["ec"]])
    (sig,) = c2.call(cid("C_Sign"), [s2, b"\2" * 32, 64])
    assert len(sig) == 64
    c2.close()
    assert gw.alive()

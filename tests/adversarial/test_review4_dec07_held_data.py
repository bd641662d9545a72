"""Operation data the in-process tokens hold is bounded (fourth review). Each session
may keep about a MiB per operation (KMIP buffers multi-part input for the server, the
soft token holds GCM ciphertext until the tag); one local user with its thousands of
sessions put gigabytes into the gateway's own memory. Past 256 MiB per token the call
gets CKR_DEVICE_MEMORY, and what is freed can be used again. Both fail without the fix
(every Update was taken)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_ENCRYPT,
    CKA_KEY_TYPE,
    CKA_VALUE,
    CKK_AES,
    CKO_SECRET_KEY,
    b,
    call,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway, RawClient
from tests.kmip_backend.conftest import kmip_gateway_config, kmip_server  # noqa: F401
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.kmip_backend.test_kmip_raw import CKM_SHA256_RSA, rsa_pair, session
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config

from p11gate.backends.token_backend import MAX_HELD
from p11gate.codec import Mechanism, ckr
from p11gate.codec.tables import V026
from p11gate.codec.values import GcmParams

CHUNK = 1000 * 1024  # one Update per session, inside the 1 MiB frame
SESSIONS = MAX_HELD // CHUNK + 8


def _fill(c: RawClient, slot: int, start: Callable[[int], None], update: str) -> list[int]:
    """Sessions each holding CHUNK bytes until the token refuses; their handles (the
    last one's Update was refused)."""
    data = os.urandom(CHUNK)
    opened = []
    for _ in range(SESSIONS):
        (sess,) = call(c, "C_OpenSession", slot, 6)
        opened.append(sess)
        start(sess)
        args = (data,) if update == "C_SignUpdate" else (data, 0xFFFF)
        code = rv(c, update, sess, *args)
        if code != ckr.OK:
            assert code == ckr.DEVICE_MEMORY
            return opened
    raise AssertionError(f"{SESSIONS} sessions held {SESSIONS * CHUNK} bytes")


def test_kmip_token_holds_bounded_operation_data(kmip_server: KmipServerProc,  # noqa: F811
                                                 tmp_path: Path) -> None:
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    try:
        c, sess = session(gw)
        _pub, priv = rsa_pair(c, sess, "held")
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        mech = Mechanism(CKM_SHA256_RSA, None)
        opened = _fill(c, slots[0], lambda h: call(c, "C_SignInit", h, mech, priv),
                       "C_SignUpdate")
        assert len(opened) * CHUNK > MAX_HELD - 2 * CHUNK  # the budget, not less
        for h in opened[: len(opened) // 2]:
            call(c, "C_CloseSession", h)
        # what was given back serves again (the signature of a MiB is more than the
        # PyKMIP server answers within the socket timeout: a small one)
        for h in opened[len(opened) // 2:][:64]:
            call(c, "C_SignUpdate", h, b"x")
        call(c, "C_SignInit", sess, mech, priv)
        call(c, "C_SignUpdate", sess, os.urandom(4096))
        (sig,) = call(c, "C_SignFinal", sess, 512)
        assert len(sig) == 256
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]


def test_soft_token_holds_bounded_operation_data(tmp_path: Path) -> None:
    gw = Gateway(soft_gateway_config(tmp_path))
    try:
        c = RawClient(gw.path, version=2, dialect=V026, timeout=30)
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], 6)
        call(c, "C_Login", sess, 1, USER_PIN.encode())
        (key,) = call(c, "C_CreateObject", sess, [
            u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), s(CKA_VALUE, b"k" * 16),
            b(CKA_ENCRYPT, True), b(0x105, True)])  # CKA_DECRYPT
        gcm = Mechanism(0x1087, GcmParams(b"\1" * 12, 96, b"", 128))
        opened = _fill(c, slots[0], lambda h: call(c, "C_DecryptInit", h, gcm, key),
                       "C_DecryptUpdate")
        assert len(opened) * CHUNK > MAX_HELD - 2 * CHUNK
        for h in opened[: len(opened) // 2]:
            call(c, "C_CloseSession", h)
        call(c, "C_EncryptInit", sess, gcm, key)
        (ct,) = call(c, "C_Encrypt", sess, b"after", 64)
        call(c, "C_DecryptInit", sess, gcm, key)
        assert call(c, "C_DecryptUpdate", sess, ct, 64) == [b""]
        assert call(c, "C_DecryptFinal", sess, 64) == [b"after"]
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]


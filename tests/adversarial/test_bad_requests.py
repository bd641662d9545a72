"""Bad requests cost their sender one error, with the code PKCS#11 gives (issue 15,
points 1, 2, 5 and 14), sent as raw frames.

* an unknown handle where the argument is a key gets the key's code
  (CKR_KEY_HANDLE_INVALID, CKR_WRAPPING_KEY_HANDLE_INVALID, …), object calls keep
  CKR_OBJECT_HANDLE_INVALID;
* C_SetOperationState (whose key handles the gateway once looked for in the wrong
  places) gets the module's answer and the connection lives on;
* a read-only session while the SO is logged in is CKR_SESSION_READ_WRITE_SO_EXISTS;
* malformed input that a module answers with CKR_GENERAL_ERROR does not take pool
  members down, is not retried elsewhere, and a bystander signing meanwhile sees no error.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_LABEL,
    CKF_RW,
    CKF_SERIAL,
    CKM_ECDSA,
    CKO_PRIVATE_KEY,
    CKU_SO,
    CKU_USER,
    call,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway, write_config
from tests.policy.tenants import raw, slot_of
from tests.pools.members import PIN, key_material, make_member, pool_config
from tests.softhsm import make_token

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr

CKM_RSA_PKCS, CKM_AES_KEY_WRAP = 0x1, 0x2109


def test_unknown_handles_get_the_code_of_their_role(tmp_path: Path) -> None:
    token = make_token(tmp_path / "hsm")
    gw = Gateway(write_config(tmp_path, token))
    try:
        c = raw(gw.path)
        slot = slot_of(c, "signing")
        (sess,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
        call(c, "C_Login", sess, CKU_USER, token["pin"].encode())
        bad = 77777
        codes = {
            "digest_key": rv(c, "C_DigestKey", sess, bad),
            "sign_init": rv(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), bad),
            "wrap_wrapping": rv(c, "C_WrapKey", sess, Mechanism(CKM_AES_KEY_WRAP, None),
                                bad, bad, 64),
            "unwrap": rv(c, "C_UnwrapKey", sess, Mechanism(CKM_AES_KEY_WRAP, None), bad,
                         b"\x00" * 24, []),
            "get_attribute": rv(c, "C_GetObjectSize", sess, bad),
            "destroy": rv(c, "C_DestroyObject", sess, bad),
        }
        assert codes == {
            # no digest active: the module's answer whatever the handle (issue 15 point
            # 6, error precedence; SoftHSM directly gives the same)
            "digest_key": ckr.OPERATION_NOT_INITIALIZED,
            "sign_init": ckr.KEY_HANDLE_INVALID,
            "wrap_wrapping": ckr.WRAPPING_KEY_HANDLE_INVALID,
            "unwrap": 0xF0,  # CKR_UNWRAPPING_KEY_HANDLE_INVALID
            "get_attribute": ckr.OBJECT_HANDLE_INVALID,
            "destroy": ckr.OBJECT_HANDLE_INVALID,
        }
        call(c, "C_DigestInit", sess, Mechanism(0x250, None))  # CKM_SHA256
        assert rv(c, "C_DigestKey", sess, bad) == ckr.KEY_HANDLE_INVALID
        # C_SetOperationState(session, state, encryption key, authentication key): the
        # module's own answer, and the connection lives on
        own = rv(c, "C_SetOperationState", sess, b"\x00" * 16, 0, 0)
        assert own not in (ckr.OK, ckr.GENERAL_ERROR, ckr.DEVICE_ERROR)
        # an unknown key: the module's refusal when it does not have the function at all
        # (SoftHSM), else the key's code
        assert rv(c, "C_SetOperationState", sess, b"\x00" * 16, bad, 0) == (
            own if own == ckr.FUNCTION_NOT_SUPPORTED else ckr.KEY_HANDLE_INVALID)
        (data,) = call(c, "C_GenerateRandom", sess, 16)
        assert len(data) == 16
        c.close()
    finally:
        gw.stop()


def test_no_read_only_session_while_the_so_is_logged_in(tmp_path: Path) -> None:
    token = make_token(tmp_path / "hsm", keys=False)
    gw = Gateway(write_config(tmp_path, token))
    try:
        c = raw(gw.path)
        slot = slot_of(c, "signing")
        (sess,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
        call(c, "C_Login", sess, CKU_SO, token["so_pin"].encode())
        assert rv(c, "C_OpenSession", slot, CKF_SERIAL) == ckr.SESSION_READ_WRITE_SO_EXISTS
        assert rv(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW) == ckr.OK
        c.close()
    finally:
        gw.stop()


def _members(base: Path) -> list[dict[str, Any]]:
    return list(query(str(base / "state" / "admin.sock"))["pools"][0]["members"])


def test_a_clients_garbage_does_not_take_pool_members_down(tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys")
    members = [make_member(tmp_path, i, keys) for i in range(2)]
    gw = Gateway(pool_config(tmp_path, members))
    stop = threading.Event()
    errors: list[str] = []
    signed = [0]
    signing = threading.Event()  # the garbage starts once the bystander signs

    def bystander() -> None:
        c = raw(gw.path)
        (sess,) = call(c, "C_OpenSession", slot_of(c, "ha-token"), CKF_SERIAL)
        call(c, "C_Login", sess, CKU_USER, PIN.encode())
        (key,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
        while not stop.is_set():
            try:
                call(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), key)
                call(c, "C_Sign", sess, b"\x01" * 32, 256)
                signed[0] += 1
                signing.set()
            except Exception as e:  # every error counts against the gateway
                errors.append(repr(e))
                signing.set()
        c.close()

    th = threading.Thread(target=bystander)
    th.start()
    assert signing.wait(60)
    try:
        c = raw(gw.path)
        (sess,) = call(c, "C_OpenSession", slot_of(c, "ha-token"), CKF_SERIAL)
        call(c, "C_Login", sess, CKU_USER, PIN.encode())
        (rsa,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "rsa1")])
        answers = set()
        for i in range(40):
            # RSA PKCS#1 decryption of garbage: SoftHSM answers CKR_GENERAL_ERROR
            call(c, "C_DecryptInit", sess, Mechanism(CKM_RSA_PKCS, None), rsa)
            answers.add(rv(c, "C_Decrypt", sess, bytes([i + 1]) * 256, 512))
        c.close()
    finally:
        stop.set()
        th.join()
    try:
        assert answers and ckr.OK not in answers, answers
        assert errors == [], errors[:5]
        assert signed[0] > 0
        st = _members(tmp_path)
        assert [m["state"] for m in st] == ["up", "up"], st
        downs = [r for r in gw.records() if "down" in str(r.get("msg", ""))
                 and r.get("logger") == "p11gate.pool"]
        assert downs == [], downs[:3]
    finally:
        gw.stop()

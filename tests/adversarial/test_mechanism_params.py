"""Issue 9.1: client-chosen pointers must not reach the vendor module.

A hostile tenant (role "readonly", not logged in, read-only session) speaks raw frames:
C_DeriveKey with CKM_AES_ECB_ENCRYPT_DATA and a CK_KEY_DERIVATION_STRING_DATA whose pData
is 0x4141414141414141 made SoftHSM dereference that address (the worker crashed, every
client lost its sessions; in-process, the gateway died). Now the gateway refuses raw bytes
for any parameter that holds pointers before a backend call, in both isolation modes and
all three dialects; vendor mechanisms pass only when the operator lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.mechparams_env import (
    CKM_AES_ECB_ENCRYPT_DATA,
    DERIVED,
    HOSTILE_STRING_DATA,
    LISTED_VENDOR,
    RO,
    SESSION_AES,
    UNLISTED_VENDOR,
    C_DeriveKey,
    C_EncryptInit,
    C_GenerateKey,
    C_SignInit,
    connect,
    gateway,
    random_ok,
    raw_call_rv,
    ro_session_with_key,
)
from tests.gateway_proc import Gateway, rv_of, worker_pids
from tests.policy.tenants import CKF_SERIAL, C_OpenSession, as_uid, slot_of
from tests.softhsm import make_token
from tests.unit.test_worker import WORKER, Peer

from p11gate.backends.native import NativeModule
from p11gate.codec import HANDSHAKE, Mechanism, ReplyError, ckr
from p11gate.errors import Pkcs11Error

CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CCM, CKM_AES_XCBC_MAC = 0x1081, 0x1082, 0x1088, 0x108C
CKM_AES_KEY_WRAP = 0x2109
C_EncryptMessage, C_SignMessageBegin = 69, 80


@pytest.fixture(scope="module", params=["process", "none"])
def gw(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway(tmp_path_factory.mktemp(f"mechparams-{request.param}"), request.param) as g:
        yield g


def hostile_derive(path: str, version: int) -> dict[str, Any]:
    """As the readonly uid: the attack of the issue, and a few neighbours of it."""
    c = connect(path, version)
    s, key = ro_session_with_key(c)
    out = {
        "derive": raw_call_rv(c, C_DeriveKey, s, key, CKM_AES_ECB_ENCRYPT_DATA,
                              HOSTILE_STRING_DATA),
        # the same bytes on an encrypt init of a pointer-bearing mechanism (CK_CCM_PARAMS)
        "ccm": raw_call_rv(c, C_EncryptInit, s, key, CKM_AES_CCM, HOSTILE_STRING_DATA),
        # a parameter for a mechanism that takes none
        "noparam": raw_call_rv(c, C_SignInit, s, key, CKM_AES_XCBC_MAC, HOSTILE_STRING_DATA),
        # an unknown standard-range mechanism
        "unknown": raw_call_rv(c, C_EncryptInit, s, key, 0x7777, HOSTILE_STRING_DATA),
        # a flat parameter of the wrong size (the optional IV is 8 bytes)
        "bad_size": raw_call_rv(c, C_EncryptInit, s, key, CKM_AES_KEY_WRAP, b"\0" * 16),
        # the session still works afterwards
        "after": random_ok(c, s),
    }
    c.close()
    return out


def vendor_calls(path: str, version: int) -> dict[str, int]:
    c = connect(path, version)
    s, key = ro_session_with_key(c)
    out = {
        "unlisted": raw_call_rv(c, C_EncryptInit, s, key, UNLISTED_VENDOR, HOSTILE_STRING_DATA),
        "listed": raw_call_rv(c, C_EncryptInit, s, key, LISTED_VENDOR, HOSTILE_STRING_DATA),
    }
    c.close()
    return out


def flat_calls(path: str, version: int) -> dict[str, int]:
    """Parameters without pointers still reach the module as raw bytes; NULL and empty
    parameters of a parameterless mechanism still work (a fresh session each: a
    successful init leaves an operation active)."""
    c = connect(path, version)
    out = {}
    for name, mtype, param in [("cbc", CKM_AES_CBC, b"\1" * 16), ("null", CKM_AES_ECB, None),
                               ("empty", CKM_AES_ECB, b""), ("xcbc", CKM_AES_XCBC_MAC, None)]:
        s, key = ro_session_with_key(c)
        call = C_SignInit if mtype == CKM_AES_XCBC_MAC else C_EncryptInit
        out[name] = raw_call_rv(c, call, s, key, mtype, param)
    c.close()
    return out


@pytest.mark.parametrize("version", [0, 1, 2])
def test_hostile_pointer_parameter_refused(gw: Gateway, version: int) -> None:
    bystander = connect(gw.path, 2)
    (bs,) = bystander.call(C_OpenSession, [slot_of(bystander, "shared"), CKF_SERIAL])
    workers = worker_pids(gw)

    got = as_uid(RO, hostile_derive, gw.path, version)

    assert got["derive"] == ckr.MECHANISM_PARAM_INVALID, got
    assert got["ccm"] == ckr.MECHANISM_PARAM_INVALID, got
    assert got["noparam"] == ckr.MECHANISM_PARAM_INVALID, got
    assert got["unknown"] == ckr.MECHANISM_PARAM_INVALID, got
    assert got["bad_size"] == ckr.MECHANISM_PARAM_INVALID, got
    assert got["after"] is True
    assert gw.alive(), gw.log()[-3000:]
    assert worker_pids(gw) == workers  # the same worker (none at all in-process)
    assert random_ok(bystander, bs)  # another client's session survived
    bystander.close()
    down = [r for r in gw.records() if r.get("msg") == "backend down"]
    assert down == [], down


@pytest.mark.parametrize("version", [0, 2])
def test_vendor_mechanism_only_when_listed(gw: Gateway, version: int) -> None:
    workers = worker_pids(gw)
    got = as_uid(RO, vendor_calls, gw.path, version)
    assert got["unlisted"] == ckr.MECHANISM_PARAM_INVALID, got
    # listed: it reaches SoftHSM, which does not know the mechanism
    assert got["listed"] == ckr.MECHANISM_INVALID, got
    assert gw.alive() and worker_pids(gw) == workers


@pytest.mark.parametrize("version", [0, 2])
def test_flat_and_empty_parameters_still_work(gw: Gateway, version: int) -> None:
    got = as_uid(RO, flat_calls, gw.path, version)
    # SoftHSM has no AES-XCBC-MAC: it says so itself, so the empty parameter reached it
    assert got == {"cbc": ckr.OK, "null": ckr.OK, "empty": ckr.OK,
                   "xcbc": ckr.MECHANISM_INVALID}, got


def message_calls(path: str) -> dict[str, int]:
    """PKCS#11 3.0 message-based calls carry a per-message parameter (CK_GCM_MESSAGE_PARAMS
    {pIv, …, pTag, …}) as raw bytes: refused when non-empty; a NULL one still reaches the
    module (SoftHSM 2.6 has no message functions and says so)."""
    c = connect(path, 2)
    s, _ = ro_session_with_key(c)
    out = {
        "encrypt": rv_of(c, C_EncryptMessage, [s, HOSTILE_STRING_DATA, b"", b"data", 64]),
        "sign_begin": rv_of(c, C_SignMessageBegin, [s, HOSTILE_STRING_DATA]),
        "null": rv_of(c, C_EncryptMessage, [s, None, b"", b"data", 64]),
    }
    c.close()
    return out


def test_message_parameters_refused(gw: Gateway) -> None:
    got = as_uid(RO, message_calls, gw.path)
    assert got == {"encrypt": ckr.MECHANISM_PARAM_INVALID,
                   "sign_begin": ckr.MECHANISM_PARAM_INVALID,
                   "null": ckr.FUNCTION_NOT_SUPPORTED}, got


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm-direct"), label="direct")


def test_worker_refuses_raw_pointer_parameter_itself(hsm: dict[str, Any]) -> None:
    """Defence in depth: a `p11gate worker` spoken to directly (no frontend in front of
    it) refuses the raw struct too, and passes the vendor mechanism it was told to."""
    peer = Peer([*WORKER, hsm["module"], "--raw-parameter-mechanism", f"{LISTED_VENDOR:#x}"],
                hsm["env"])
    try:
        peer.handshake(0)
        peer.call(1, [HANDSHAKE, 0, b"\0"])
        (slots,) = peer.call(4, [1, 16])
        (s,) = peer.call(C_OpenSession, [slots[0], CKF_SERIAL])
        (key,) = peer.call(C_GenerateKey, [s, Mechanism(0x1080, None), SESSION_AES])

        def rv(call_id: int, mtype: int, param: bytes) -> int:
            args: list[Any] = [s, Mechanism(mtype, param), key]
            if call_id == C_DeriveKey:
                args.append(DERIVED)
            try:
                peer.call(call_id, args)
            except ReplyError as e:
                return e.rv
            return ckr.OK

        assert rv(C_DeriveKey, CKM_AES_ECB_ENCRYPT_DATA, HOSTILE_STRING_DATA) == \
            ckr.MECHANISM_PARAM_INVALID
        assert rv(C_EncryptInit, UNLISTED_VENDOR, HOSTILE_STRING_DATA) == \
            ckr.MECHANISM_PARAM_INVALID
        assert rv(C_EncryptInit, LISTED_VENDOR, HOSTILE_STRING_DATA) == ckr.MECHANISM_INVALID
        assert peer.proc.poll() is None
    finally:
        peer.close()


def test_native_layer_refuses_raw_pointer_parameter(hsm: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check in the in-process native layer (isolation = "none")."""
    monkeypatch.setenv("SOFTHSM2_CONF", hsm["conf"])
    mod = NativeModule(hsm["module"], raw_parameter_mechanisms=[LISTED_VENDOR])
    mod.initialize()
    try:
        (slots,) = mod.call(4, [1, 16])
        (s,) = mod.call(C_OpenSession, [slots[0], CKF_SERIAL])
        (key,) = mod.call(C_GenerateKey, [s, Mechanism(0x1080, None), SESSION_AES])
        with pytest.raises(Pkcs11Error) as e:
            mod.call(C_DeriveKey, [s, Mechanism(CKM_AES_ECB_ENCRYPT_DATA, HOSTILE_STRING_DATA),
                                   key, DERIVED])
        assert e.value.rv == ckr.MECHANISM_PARAM_INVALID
        with pytest.raises(Pkcs11Error) as e:
            mod.call(C_EncryptInit, [s, Mechanism(LISTED_VENDOR, HOSTILE_STRING_DATA), key])
        assert e.value.rv == ckr.MECHANISM_INVALID  # reached SoftHSM
        with pytest.raises(Pkcs11Error) as e:
            mod.call(C_EncryptMessage, [s, HOSTILE_STRING_DATA, b"", b"data", 64])
        assert e.value.rv == ckr.MECHANISM_PARAM_INVALID
        mod.call(C_EncryptInit, [s, Mechanism(CKM_AES_CBC, b"\0" * 16), key])
    finally:
        mod.finalize()

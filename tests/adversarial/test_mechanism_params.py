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
    C_DeriveKey,
    C_EncryptInit,
    C_SignInit,
    CKM_AES_ECB_ENCRYPT_DATA,
    HOSTILE_STRING_DATA,
    LISTED_VENDOR,
    RO,
    UNLISTED_VENDOR,
    connect,
    gateway,
    random_ok,
    raw_call_rv,
    ro_session_with_key,
)
from tests.gateway_proc import Gateway, worker_pids
from tests.policy.tenants import CKF_SERIAL, C_OpenSession, as_uid, slot_of

from p11gate.codec import ckr

CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CCM, CKM_AES_XCBC_MAC = 0x1081, 0x1082, 0x1088, 0x108C
CKM_AES_KEY_WRAP = 0x2109


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
    refused = [r for r in gw.records() if "restart" in str(r.get("msg", "")).lower()]
    assert refused == [], refused


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


def test_worker_refuses_raw_pointer_parameter_itself(gw: Gateway) -> None:
    """Defence in depth: the worker (or in-process native layer) refuses the raw struct
    even when the frontend's check is bypassed (here: called directly)."""
    from p11gate.backends.native.module import NativeModule
    from p11gate.codec import Mechanism
    from p11gate.errors import Pkcs11Error

    mod = NativeModule.__new__(NativeModule)
    mod.raw_parameter_mechanisms = frozenset({LISTED_VENDOR})
    keep: list[Any] = []
    with pytest.raises(Pkcs11Error) as e:
        mod._mechanism(Mechanism(CKM_AES_ECB_ENCRYPT_DATA, HOSTILE_STRING_DATA), keep, None)
    assert e.value.rv == ckr.MECHANISM_PARAM_INVALID
    with pytest.raises(Pkcs11Error):
        mod._mechanism(Mechanism(UNLISTED_VENDOR, HOSTILE_STRING_DATA), keep, None)
    assert mod._mechanism(Mechanism(LISTED_VENDOR, HOSTILE_STRING_DATA), keep, None)
    assert mod._mechanism(Mechanism(CKM_AES_CBC, b"\0" * 16), keep, None).ulParameterLen == 16
    empty = mod._mechanism(Mechanism(CKM_AES_ECB, b""), keep, None)
    assert empty.ulParameterLen == 0


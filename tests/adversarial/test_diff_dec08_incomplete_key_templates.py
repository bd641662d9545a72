"""A key template without an attribute PKCS#11 requires at C_CreateObject (an RSA public
key without CKA_PUBLIC_EXPONENT, …) is refused before the module with
CKR_TEMPLATE_INCOMPLETE. SoftHSM gives the same code but keeps the object it began: a
search lists it, C_VerifyInit(CKM_RSA_PKCS) takes it and the C_Verify after kills the
worker (every tenant's sessions on the back end) or, in-process, the gateway. Found by
the differential fuzzer (tests/conformance/test_differential_fuzz.py); no login needed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_TOKEN,
    CKA_VERIFY,
    CKF_RW,
    CKF_SERIAL,
    CKO_PUBLIC_KEY,
    b,
    call,
    rv,
    s,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient, worker_pids, write_config
from tests.softhsm import make_token, requires_softhsm

from p11gate.codec import V026, Mechanism, ckr
from p11gate.codec import constants as ck

pytestmark = requires_softhsm

MODULUS = bytes([0xC5]) + bytes(range(1, 128))


@pytest.fixture(params=["process", "none"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(write_config(tmp_path, make_token(tmp_path / "hsm", keys=False),
                              request.param))
    yield gw
    stop_gateway(gw)


def _client(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path, 2, V026)
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
    return c, sess


def test_a_key_without_its_exponent_is_not_made(gateway: Gateway) -> None:
    c, sess = _client(gateway)
    workers = worker_pids(gateway)
    pub = [u(CKA_CLASS, CKO_PUBLIC_KEY), u(CKA_KEY_TYPE, ck.CKK_RSA), b(CKA_TOKEN, False),
           s(CKA_LABEL, "ghost"), b(CKA_VERIFY, True), s(ck.CKA_MODULUS, MODULUS)]
    assert rv(c, "C_CreateObject", sess, pub) == ckr.TEMPLATE_INCOMPLETE
    call(c, "C_FindObjectsInit", sess, [s(CKA_LABEL, "ghost")])
    (found,) = call(c, "C_FindObjects", sess, 8)
    call(c, "C_FindObjectsFinal", sess)
    for h in found:  # before the fix: the half-made key, and a crash
        call(c, "C_VerifyInit", sess, Mechanism(ck.CKM_RSA_PKCS, None), h)
        rv(c, "C_Verify", sess, b"abc", b"\x01" * 128)
    assert found == []
    # the module is fine and so is the connection; the other required attributes too
    assert len(call(c, "C_GenerateRandom", sess, 8)[0]) == 8
    for template in (
        [u(CKA_CLASS, CKO_PUBLIC_KEY), u(CKA_KEY_TYPE, ck.CKK_EC), b(CKA_TOKEN, False),
         s(ck.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"))],
        [u(CKA_CLASS, ck.CKO_SECRET_KEY), u(CKA_KEY_TYPE, ck.CKK_AES), b(CKA_TOKEN, False)],
    ):
        assert rv(c, "C_CreateObject", sess, template) == ckr.TEMPLATE_INCOMPLETE
    call(c, "C_FindObjectsInit", sess, [])
    assert call(c, "C_FindObjects", sess, 8) == [[]]
    call(c, "C_FindObjectsFinal", sess)
    assert worker_pids(gateway) == workers
    c.close()

"""A key of the wrong family for an asymmetric mechanism reached the module. SoftHSM 2.6
accepts C_SignInit(CKM_RSA_X_509 or CKM_RSA_PKCS_PSS) for an AES, generic-secret or EC
key and crashes in the C_Sign after it (found by a key-aware raw-frame fuzzer); with
CKM_RSA_PKCS or CKM_ECDSA and a key of another family it answers CKR_GENERAL_ERROR. In
process isolation the worker died with every tenant's sessions, in-process the gateway.
The gateway now checks CKA_KEY_TYPE against the mechanism first
(frontend/key_types.py).

Raw frames (pipelined, as an attacker sends them), a real gateway over real SoftHSM,
both isolations; a bystander's session on the same back end must survive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_EC_PARAMS,
    CKA_SIGN,
    CKA_TOKEN,
    CKA_VALUE_LEN,
    CKM_AES_KEY_GEN,
    CKM_ECDSA,
    P256,
    b,
    call,
    logged_in,
    pipeline,
    rv,
    s,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient, worker_pids, write_config
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr
from p11gate.codec.values import Ecdh1Params, PssParams

CKM_RSA_PKCS, CKM_RSA_X_509, CKM_RSA_PKCS_PSS, CKM_SHA256 = 0x1, 0x3, 0xD, 0x250
CKM_GENERIC_SECRET_KEY_GEN, CKM_EC_KEY_PAIR_GEN, CKM_ECDH1_DERIVE = 0x350, 0x1040, 0x1050
CKM_RSA_PKCS_KEY_PAIR_GEN, CKA_MODULUS_BITS, CKA_DERIVE, CKA_WRAP = 0x0, 0x121, 0x10C, 0x106
CKM_SHA256_HMAC = 0x251

MECHANISMS = {
    "rsa-x509": Mechanism(CKM_RSA_X_509, None),
    "rsa-pss": Mechanism(CKM_RSA_PKCS_PSS, PssParams(CKM_SHA256, 2, 32)),
    "rsa-pkcs": Mechanism(CKM_RSA_PKCS, None),
    "ecdsa": Mechanism(CKM_ECDSA, None),
}
#: (mechanism, key kind) pairs of the wrong family
WRONG = [(m, k) for m in ("rsa-x509", "rsa-pss", "rsa-pkcs") for k in ("aes", "secret", "ec")] \
    + [("ecdsa", k) for k in ("aes", "secret", "rsa")]


@pytest.fixture(scope="module", params=["process", "none"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp(f"keytypes-{request.param}")
    gw = Gateway(write_config(base, make_token(base / "hsm", keys=False), request.param))
    yield gw
    stop_gateway(gw)


def make_key(c: RawClient, sess: int, kind: str) -> int:
    on = [b(CKA_TOKEN, False), b(CKA_SIGN, True), b(CKA_DERIVE, True), b(CKA_WRAP, True)]
    if kind in ("aes", "secret"):
        mech = CKM_AES_KEY_GEN if kind == "aes" else CKM_GENERIC_SECRET_KEY_GEN
        (key,) = call(c, "C_GenerateKey", sess, Mechanism(mech, None),
                      [u(CKA_VALUE_LEN, 32), *on])
        return int(key)
    if kind == "ec":
        pub = [s(CKA_EC_PARAMS, P256), b(CKA_TOKEN, False)]
        mech = CKM_EC_KEY_PAIR_GEN
    else:
        pub = [u(CKA_MODULUS_BITS, 1024), b(CKA_TOKEN, False)]
        mech = CKM_RSA_PKCS_KEY_PAIR_GEN
    _pub, priv = call(c, "C_GenerateKeyPair", sess, Mechanism(mech, None), pub,
                      [b(CKA_TOKEN, False), b(CKA_SIGN, True), b(CKA_DERIVE, True)])
    return int(priv)


@pytest.mark.parametrize(("mechanism", "kind"), WRONG)
def test_wrong_key_family_is_refused_before_the_module(gateway: Gateway, mechanism: str,
                                                       kind: str) -> None:
    bystander, bs = logged_in(gateway)
    workers = worker_pids(gateway)
    c, sess = logged_in(gateway)
    key = make_key(c, sess, kind)
    init_rv, sign_rv = pipeline(c, [("C_SignInit", [sess, MECHANISMS[mechanism], key]),
                                    ("C_Sign", [sess, b"I" * 48, 512])])
    assert (init_rv, sign_rv) == (ckr.KEY_TYPE_INCONSISTENT, ckr.OPERATION_NOT_INITIALIZED)
    assert len(call(bystander, "C_GenerateRandom", bs, 16)[0]) == 16
    assert gateway.alive() and worker_pids(gateway) == workers
    assert not [r for r in gateway.records() if r.get("msg") == "backend down"]
    c.close()
    bystander.close()


def test_other_key_roles_are_checked_too(gateway: Gateway) -> None:
    """The wrapping key of C_WrapKey and the base key of C_DeriveKey: same rule."""
    c, sess = logged_in(gateway, 2)  # a dialect that carries ECDH parameters
    aes, rsa = make_key(c, sess, "aes"), make_key(c, sess, "rsa")
    assert rv(c, "C_WrapKey", sess, Mechanism(CKM_RSA_PKCS, None), aes, aes, 4096) == \
        ckr.WRAPPING_KEY_TYPE_INCONSISTENT
    point = Ecdh1Params(1, None, b"\x04" + b"\1" * 64)
    derive: list[Any] = [sess, Mechanism(CKM_ECDH1_DERIVE, point), rsa,
                         [b(CKA_TOKEN, False)]]
    assert rv(c, "C_DeriveKey", *derive) == ckr.KEY_TYPE_INCONSISTENT
    c.close()


@pytest.mark.parametrize(("mechanism", "kind"), [("rsa-x509", "rsa"), ("rsa-pss", "rsa"),
                                                 ("rsa-pkcs", "rsa"), ("ecdsa", "ec")])
def test_the_right_family_signs(gateway: Gateway, mechanism: str, kind: str) -> None:
    c, sess = logged_in(gateway)
    key = make_key(c, sess, kind)
    data = b"\1" * (128 if mechanism == "rsa-x509" else 32)
    for _ in range(2):  # the second init uses the key type kept on the handle
        call(c, "C_SignInit", sess, MECHANISMS[mechanism], key)
        (sig,) = call(c, "C_Sign", sess, data, 512)
        assert len(sig) in (64, 128)
    hmac = make_key(c, sess, "secret")  # a mechanism the table does not list: the module's
    call(c, "C_SignInit", sess, Mechanism(CKM_SHA256_HMAC, None), hmac)
    assert len(call(c, "C_Sign", sess, b"x", 64)[0]) == 32
    c.close()


RAW = Mechanism(CKM_RSA_X_509, None)
CKA_ENCRYPT, CKA_VERIFY = 0x104, 0x10A


@pytest.mark.parametrize("op", ["encrypt", "sign", "verify-data", "verify-signature"])
def test_raw_rsa_data_longer_than_the_modulus(gateway: Gateway, op: str) -> None:
    """CKM_RSA_X_509 with one byte more than the 128-byte modulus crashed SoftHSM."""
    bystander, bs = logged_in(gateway)
    workers = worker_pids(gateway)
    c, sess = logged_in(gateway)
    pub, priv = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                     [u(CKA_MODULUS_BITS, 1024), b(CKA_TOKEN, False), b(CKA_ENCRYPT, True),
                      b(CKA_VERIFY, True)], [b(CKA_TOKEN, False), b(CKA_SIGN, True)])
    long, fits = b"A" * 129, b"\1" * 128
    init, one, key, args, code = {
        "encrypt": ("C_EncryptInit", "C_Encrypt", pub, [long, 512], ckr.DATA_LEN_RANGE),
        "sign": ("C_SignInit", "C_Sign", priv, [long, 512], ckr.DATA_LEN_RANGE),
        "verify-data": ("C_VerifyInit", "C_Verify", pub, [long, fits], ckr.DATA_LEN_RANGE),
        "verify-signature": ("C_VerifyInit", "C_Verify", pub, [fits, long],
                             ckr.SIGNATURE_LEN_RANGE),
    }[op]
    assert pipeline(c, [(init, [sess, RAW, key]), (one, [sess, *args])]) == [ckr.OK, code]
    assert len(call(bystander, "C_GenerateRandom", bs, 16)[0]) == 16
    assert gateway.alive() and worker_pids(gateway) == workers
    # the limit belongs to raw RSA: PKCS #1 v1.5 on the same session takes its own sizes
    call(c, "C_SignInit", sess, Mechanism(CKM_RSA_PKCS, None), priv)
    assert len(call(c, "C_Sign", sess, b"x" * 100, 512)[0]) == 128
    c.close()
    bystander.close()


def test_a_refused_init_keeps_the_raw_limit(gateway: Gateway) -> None:
    """The limit follows the operation the module has: an init it refuses (another is
    active) changes nothing. Before, a refused AES init dropped the limit, and a
    refused raw init with a larger key raised it, and the crash came back."""
    bystander, bs = logged_in(gateway)
    workers = worker_pids(gateway)
    c, sess = logged_in(gateway)
    small = [u(CKA_MODULUS_BITS, 1024), b(CKA_TOKEN, False), b(CKA_ENCRYPT, True)]
    big = [u(CKA_MODULUS_BITS, 2048), b(CKA_TOKEN, False), b(CKA_ENCRYPT, True)]
    priv = [b(CKA_TOKEN, False)]
    pub1, _ = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                   small, priv)
    pub2, _ = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                   big, priv)
    aes = make_key(c, sess, "aes")
    got = pipeline(c, [("C_EncryptInit", [sess, RAW, pub1]),
                       ("C_EncryptInit", [sess, Mechanism(0x1081, None), aes]),  # AES-ECB
                       ("C_EncryptInit", [sess, RAW, pub2]),
                       ("C_Encrypt", [sess, b"A" * 200, 512])])
    assert got == [ckr.OK, ckr.OPERATION_ACTIVE, ckr.OPERATION_ACTIVE, ckr.DATA_LEN_RANGE]
    assert len(call(bystander, "C_GenerateRandom", bs, 16)[0]) == 16
    assert gateway.alive() and worker_pids(gateway) == workers
    c.close()
    bystander.close()

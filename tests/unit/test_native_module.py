"""NativeModule against a real SoftHSMv2 token (no mocks)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends.native import NativeModule
from p11gate.codec import ckr
from p11gate.codec.values import (
    Attribute,
    AttrRequest,
    CtrParams,
    Ecdh1Params,
    GcmParams,
    IvParams,
    Mechanism,
    Null,
    OaepParams,
    ParamUpdate,
    PssParams,
    Version,
)
from p11gate.errors import Pkcs11Error

pytestmark = requires_softhsm

# call ids (codec.calls)
GET_INFO, GET_SLOT_LIST, GET_SLOT_INFO, GET_TOKEN_INFO = 3, 4, 5, 6
GET_MECH_LIST, GET_MECH_INFO, INIT_TOKEN, OPEN_SESSION, CLOSE_SESSION = 7, 8, 9, 10, 11
GET_SESSION_INFO, LOGIN = 13, 18
CREATE_OBJECT, DESTROY_OBJECT, GET_OBJECT_SIZE, GET_ATTR, SET_ATTR = 20, 22, 23, 24, 25
FIND_INIT, FIND, FIND_FINAL = 26, 27, 28
ENCRYPT_INIT, ENCRYPT, ENCRYPT_UPDATE, ENCRYPT_FINAL = 29, 30, 31, 32
DECRYPT_INIT, DECRYPT = 33, 34
DIGEST_INIT, DIGEST, DIGEST_UPDATE, DIGEST_FINAL = 37, 38, 39, 41
SIGN_INIT, SIGN, VERIFY_INIT, VERIFY = 42, 43, 48, 49
GENERATE_KEY, GENERATE_KEY_PAIR, WRAP_KEY, UNWRAP_KEY = 58, 59, 60, 61
GENERATE_RANDOM, WAIT_FOR_SLOT_EVENT = 64, 65
LOGIN_USER, MESSAGE_ENCRYPT_INIT, SIGN_MESSAGE_NEXT = 66, 68, 81
INIT_TOKEN2, DERIVE_KEY2 = 88, 89

# PKCS#11 constants
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY = 2, 3, 4
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE = 0x0, 0x1, 0x2, 0x3, 0x11
CKA_KEY_TYPE, CKA_ID, CKA_SENSITIVE = 0x100, 0x102, 0x103
CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY = (
    0x104,
    0x105,
    0x106,
    0x107,
    0x108,
    0x10A,
)
CKA_DERIVE, CKA_START_DATE = 0x10C, 0x110
CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT = (
    0x120,
    0x121,
    0x122,
    0x123,
)
CKA_VALUE_LEN, CKA_EXTRACTABLE, CKA_EC_PARAMS, CKA_EC_POINT = 0x161, 0x162, 0x180, 0x181
CKA_WRAP_TEMPLATE, CKA_ALLOWED_MECHANISMS = 0x40000211, 0x40000600
CKK_RSA, CKK_EC, CKK_GENERIC_SECRET, CKK_AES = 0x0, 0x3, 0x10, 0x1F
CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_OAEP, CKM_SHA256_RSA_PKCS_PSS = 0x0, 0x9, 0x43
CKM_SHA256, CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_ECDH1_DERIVE = 0x250, 0x1040, 0x1041, 0x1050
CKM_AES_KEY_GEN, CKM_AES_CBC_PAD, CKM_AES_CTR, CKM_AES_GCM = 0x1080, 0x1085, 0x1086, 0x1087
CKM_AES_KEY_WRAP = 0x2109
CKM_SHA_1, CKG_MGF1_SHA1, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, CKD_NULL = 0x220, 0x1, 0x2, 0x1, 0x1
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKS_RW_USER_FUNCTIONS = 3
P256_OID = bytes.fromhex("06082a8648ce3d030107")
UNKNOWN_ATTR = 0x80001234


def A(t: int, v: Any) -> Attribute:
    """An input attribute with its natural native length."""
    if isinstance(v, bool):
        return Attribute(t, int(v), 1)
    if isinstance(v, int):
        return Attribute(t, v, 8)
    return Attribute(t, v, len(v))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module")
def mod(token: dict[str, Any]) -> Iterator[NativeModule]:
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = token["conf"]
    m = NativeModule(token["module"])
    m.initialize()
    try:
        yield m
    finally:
        m.finalize()
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="module")
def slot(mod: NativeModule, token: dict[str, Any]) -> int:
    for s in mod.call(GET_SLOT_LIST, [1, 16])[0]:
        if mod.call(GET_TOKEN_INFO, [s])[0].rstrip() == token["label"].encode():
            return int(s)
    raise AssertionError("token not found")


@pytest.fixture(scope="module")
def session(mod: NativeModule, slot: int, token: dict[str, Any]) -> int:
    (h,) = mod.call(OPEN_SESSION, [slot, CKF_RW_SESSION | CKF_SERIAL_SESSION])
    mod.call(LOGIN, [h, 1, token["pin"].encode()])
    return int(h)


def find(mod: NativeModule, session: int, template: list[Attribute]) -> list[int]:
    mod.call(FIND_INIT, [session, template])
    try:
        (handles,) = mod.call(FIND, [session, 100])
    finally:
        mod.call(FIND_FINAL, [session])
    return list(handles)


def find_one(mod: NativeModule, session: int, cls: int, label: bytes) -> int:
    handles = find(mod, session, [A(CKA_CLASS, cls), A(CKA_LABEL, label)])
    assert len(handles) == 1
    return handles[0]


def attr_values(mod: NativeModule, session: int, obj: int, *types: int) -> list[Any]:
    """Two-step read (size query, then fill) of plain attributes."""
    sizes, rv = mod.call(GET_ATTR, [session, obj, [AttrRequest(t, 0) for t in types]])
    assert rv == ckr.OK
    attrs, rv = mod.call(GET_ATTR, [session, obj, [AttrRequest(a.type, a.length) for a in sizes]])
    assert rv == ckr.OK
    return [a.value for a in attrs]


def ec_public_key(mod: NativeModule, session: int, label: bytes) -> ec.EllipticCurvePublicKey:
    pub = find_one(mod, session, CKO_PUBLIC_KEY, label)
    (point_der,) = attr_values(mod, session, pub, CKA_EC_POINT)
    assert point_der[0] == 0x04 and point_der[1] == len(point_der) - 2  # DER OCTET STRING
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point_der[2:])


def aes_key(mod: NativeModule, session: int, **extra: Any) -> int:
    template = [
        A(CKA_CLASS, CKO_SECRET_KEY),
        A(CKA_KEY_TYPE, CKK_AES),
        A(CKA_VALUE_LEN, 32),
        A(CKA_TOKEN, False),
        A(CKA_SENSITIVE, False),
        A(CKA_EXTRACTABLE, True),
        A(CKA_ENCRYPT, True),
        A(CKA_DECRYPT, True),
        A(CKA_WRAP, True),
        A(CKA_UNWRAP, True),
    ]
    (h,) = mod.call(GENERATE_KEY, [session, Mechanism(CKM_AES_KEY_GEN), template])
    return int(h)


# ------------------------------------------------------------------ general-purpose calls


def test_function_list(mod: NativeModule) -> None:
    assert mod.interface_version == Version(2, 40)
    assert mod.supports(GENERATE_RANDOM) and mod.supports(DERIVE_KEY2)
    assert not mod.supports(LOGIN_USER)


def test_get_info(mod: NativeModule) -> None:
    version, manufacturer, flags, description, lib_version = mod.call(GET_INFO, [])
    assert version == Version(2, 40)
    assert len(manufacturer) == 32 and manufacturer.startswith(b"SoftHSM")
    assert len(description) == 32
    assert isinstance(flags, int) and isinstance(lib_version, Version)


def test_slot_list_size_query_and_too_small(mod: NativeModule, slot: int) -> None:
    (size,) = mod.call(GET_SLOT_LIST, [1, 0])
    assert isinstance(size, Null) and size.length >= 2  # our token + SoftHSM's free slot
    (slots,) = mod.call(GET_SLOT_LIST, [1, size.length])
    assert isinstance(slots, list) and len(slots) == size.length and slot in slots
    # CKR_BUFFER_TOO_SMALL is data: Null(required length)
    assert mod.call(GET_SLOT_LIST, [1, 1]) == [Null(size.length)]


def test_slot_and_token_info(mod: NativeModule, slot: int, token: dict[str, Any]) -> None:
    desc, manufacturer, flags, _hw, _fw = mod.call(GET_SLOT_INFO, [slot])
    assert len(desc) == 64 and len(manufacturer) == 32 and flags & 0x1  # CKF_TOKEN_PRESENT
    info = mod.call(GET_TOKEN_INFO, [slot])
    assert len(info) == 18
    label, _, model, serial = info[:4]
    assert label == token["label"].encode().ljust(32)
    assert len(model) == 16 and serial.decode() == token["serial"]
    assert info[4] & 0x400  # CKF_TOKEN_INITIALIZED
    assert isinstance(info[15], Version) and len(info[17]) == 16


def test_mechanisms(mod: NativeModule, slot: int) -> None:
    (size,) = mod.call(GET_MECH_LIST, [slot, 0])
    assert isinstance(size, Null) and size.length > 10
    (mechs,) = mod.call(GET_MECH_LIST, [slot, size.length])
    assert CKM_ECDSA in mechs and CKM_AES_GCM in mechs
    lo, hi, flags = mod.call(GET_MECH_INFO, [slot, CKM_ECDSA])
    assert lo <= 256 <= hi and flags & 0x800  # CKF_SIGN
    with pytest.raises(Pkcs11Error) as e:
        mod.call(GET_MECH_INFO, [slot, 0x7FFFFFF0])
    assert e.value.rv == ckr.MECHANISM_INVALID


def test_session_info(mod: NativeModule, slot: int, session: int) -> None:
    slot_id, state, flags, device_error = mod.call(GET_SESSION_INFO, [session])
    assert slot_id == slot and state == CKS_RW_USER_FUNCTIONS
    assert flags == CKF_RW_SESSION | CKF_SERIAL_SESSION and device_error == 0
    (h,) = mod.call(OPEN_SESSION, [slot, CKF_SERIAL_SESSION])
    assert mod.call(CLOSE_SESSION, [h]) == []
    with pytest.raises(Pkcs11Error) as e:
        mod.call(GET_SESSION_INFO, [h])
    assert e.value.rv == ckr.SESSION_HANDLE_INVALID


def test_generate_random(mod: NativeModule, session: int) -> None:
    (a,) = mod.call(GENERATE_RANDOM, [session, 32])
    (b,) = mod.call(GENERATE_RANDOM, [session, 32])
    assert len(a) == len(b) == 32 and a != b
    assert mod.call(GENERATE_RANDOM, [session, 0xFFFFFFFF]) == [b""]  # empty, non-NULL


def test_generate_random_concurrently(mod: NativeModule, session: int) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                assert len(mod.call(GENERATE_RANDOM, [session, 16])[0]) == 16
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------ keys and objects


def test_generate_key_pairs_and_find(mod: NativeModule, session: int) -> None:
    pub_t = [
        A(CKA_TOKEN, False),
        A(CKA_EC_PARAMS, P256_OID),
        A(CKA_VERIFY, True),
        A(CKA_LABEL, b"ec-session"),
    ]
    priv_t = [A(CKA_TOKEN, False), A(CKA_SIGN, True), A(CKA_LABEL, b"ec-session")]
    pub, priv = mod.call(
        GENERATE_KEY_PAIR, [session, Mechanism(CKM_EC_KEY_PAIR_GEN), pub_t, priv_t]
    )
    assert pub != priv
    assert find_one(mod, session, CKO_PRIVATE_KEY, b"ec-session") == priv

    pub_t = [
        A(CKA_TOKEN, False),
        A(CKA_MODULUS_BITS, 2048),
        A(CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
        A(CKA_ENCRYPT, True),
        A(CKA_LABEL, b"rsa-session"),
    ]
    priv_t = [A(CKA_TOKEN, False), A(CKA_DECRYPT, True), A(CKA_LABEL, b"rsa-session")]
    pub, priv = mod.call(
        GENERATE_KEY_PAIR, [session, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN), pub_t, priv_t]
    )
    modulus, bits, key_type = attr_values(
        mod, session, pub, CKA_MODULUS, CKA_MODULUS_BITS, CKA_KEY_TYPE
    )
    assert len(modulus) == 256 and bits == 2048 and key_type == CKK_RSA
    (size,) = mod.call(GET_OBJECT_SIZE, [session, pub])
    assert isinstance(size, int)

    # the token keys made by make_token
    assert len(find(mod, session, [A(CKA_ID, b"\x01")])) == 2
    assert len(find(mod, session, [A(CKA_CLASS, CKO_PRIVATE_KEY), A(CKA_ID, b"\x02")])) == 1
    # FindObjects size query form: NULL buffer → Null(count found)
    mod.call(FIND_INIT, [session, [A(CKA_LABEL, b"nonexistent")]])
    assert mod.call(FIND, [session, 10]) == [[]]
    mod.call(FIND_FINAL, [session])


def test_get_attribute_value(mod: NativeModule, session: int) -> None:
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"ec1")
    # size query: value None, length = the native size
    sizes, rv = mod.call(
        GET_ATTR,
        [
            session,
            priv,
            [
                AttrRequest(CKA_LABEL, 0),
                AttrRequest(CKA_ID, 0),
                AttrRequest(CKA_KEY_TYPE, 0),
                AttrRequest(CKA_SIGN, 0),
            ],
        ],
    )
    assert rv == ckr.OK
    assert sizes == [
        Attribute(CKA_LABEL, None, 3),
        Attribute(CKA_ID, None, 1),
        Attribute(CKA_KEY_TYPE, None, 8),
        Attribute(CKA_SIGN, None, 1),
    ]
    values, rv = mod.call(GET_ATTR, [session, priv, [AttrRequest(a.type, a.length) for a in sizes]])
    assert rv == ckr.OK
    assert values == [
        Attribute(CKA_LABEL, b"ec1", 3),
        Attribute(CKA_ID, b"\x01", 1),
        Attribute(CKA_KEY_TYPE, CKK_EC, 8),  # ULONG decoded from native unsigned long
        Attribute(CKA_SIGN, 1, 1),  # BBOOL one byte
    ]
    # sensitive and invalid types are in-band results, marked unavailable
    attrs, rv = mod.call(
        GET_ATTR,
        [session, priv, [AttrRequest(CKA_VALUE, 64), AttrRequest(CKA_LABEL, 16)]],
    )
    assert rv == ckr.ATTRIBUTE_SENSITIVE
    assert attrs == [Attribute(CKA_VALUE, None, None), Attribute(CKA_LABEL, b"ec1", 3)]
    attrs, rv = mod.call(GET_ATTR, [session, priv, [AttrRequest(UNKNOWN_ATTR, 0)]])
    assert rv == ckr.ATTRIBUTE_TYPE_INVALID and attrs == [Attribute(UNKNOWN_ATTR, None, None)]
    # too small a buffer
    attrs, rv = mod.call(GET_ATTR, [session, priv, [AttrRequest(CKA_LABEL, 1)]])
    assert rv == ckr.BUFFER_TOO_SMALL and attrs == [Attribute(CKA_LABEL, None, None)]
    # errors that are not in-band raise
    with pytest.raises(Pkcs11Error) as e:
        mod.call(GET_ATTR, [session, 0xDEAD, [AttrRequest(CKA_LABEL, 0)]])
    assert e.value.rv == ckr.OBJECT_HANDLE_INVALID


def test_create_object_with_nested_template(mod: NativeModule, session: int) -> None:
    wrap_template = [
        A(CKA_CLASS, CKO_SECRET_KEY),
        A(CKA_KEY_TYPE, CKK_AES),
        A(CKA_EXTRACTABLE, True),
    ]
    template = [
        A(CKA_CLASS, CKO_SECRET_KEY),
        A(CKA_KEY_TYPE, CKK_AES),
        A(CKA_TOKEN, False),
        A(CKA_VALUE, bytes(range(16))),
        A(CKA_LABEL, b"created"),
        A(CKA_WRAP, True),
        Attribute(CKA_WRAP_TEMPLATE, wrap_template, 24 * len(wrap_template)),
        Attribute(CKA_ALLOWED_MECHANISMS, [CKM_AES_KEY_WRAP, CKM_AES_GCM], 16),
    ]
    (h,) = mod.call(CREATE_OBJECT, [session, template])
    sizes, rv = mod.call(
        GET_ATTR,
        [
            session,
            h,
            [
                AttrRequest(CKA_START_DATE, 0),
                AttrRequest(CKA_WRAP_TEMPLATE, 0),
                AttrRequest(CKA_ALLOWED_MECHANISMS, 0),
            ],
        ],
    )
    assert rv == ckr.OK
    # (SoftHSM 2.6 fails with CKR_GENERAL_ERROR on non-empty CK_DATE values, so the date
    # stays empty here)
    assert sizes == [
        Attribute(CKA_START_DATE, None, 0),
        Attribute(CKA_WRAP_TEMPLATE, None, 72),
        Attribute(CKA_ALLOWED_MECHANISMS, None, 16),
    ]
    inner = [AttrRequest(a.type, a.length) for a in wrap_template]
    attrs, rv = mod.call(
        GET_ATTR,
        [
            session,
            h,
            [AttrRequest(CKA_WRAP_TEMPLATE, 72, inner), AttrRequest(CKA_ALLOWED_MECHANISMS, 16)],
        ],
    )
    assert rv == ckr.OK
    assert attrs[0].length == 72
    assert sorted(attrs[0].value) == sorted(wrap_template)
    assert attrs[1].length == 16
    assert sorted(attrs[1].value) == sorted([CKM_AES_KEY_WRAP, CKM_AES_GCM])  # a set in SoftHSM
    # old dialect: no nested request for the inner template → zeroed entries are passed
    # (NULL buffers), which the module answers with the inner types and sizes
    attrs, rv = mod.call(GET_ATTR, [session, h, [AttrRequest(CKA_WRAP_TEMPLATE, 72)]])
    assert rv == ckr.OK
    assert sorted(attrs[0].value) == sorted(
        Attribute(a.type, None, a.length) for a in wrap_template
    )
    # buffer too small for the template
    attrs, rv = mod.call(GET_ATTR, [session, h, [AttrRequest(CKA_WRAP_TEMPLATE, 24)]])
    assert rv == ckr.BUFFER_TOO_SMALL and attrs == [Attribute(CKA_WRAP_TEMPLATE, None, None)]
    # nested size query inside the template buffer
    attrs, rv = mod.call(
        GET_ATTR,
        [
            session,
            h,
            [AttrRequest(CKA_WRAP_TEMPLATE, 72, [AttrRequest(a.type, 0) for a in wrap_template])],
        ],
    )
    assert rv == ckr.OK
    assert sorted(attrs[0].value) == sorted(
        Attribute(a.type, None, a.length) for a in wrap_template
    )

    mod.call(SET_ATTR, [session, h, [A(CKA_LABEL, b"renamed")]])
    assert attr_values(mod, session, h, CKA_LABEL) == [b"renamed"]
    assert mod.call(DESTROY_OBJECT, [session, h]) == []


# ------------------------------------------------------------------ signatures


def test_sign_ecdsa_and_verify_with_cryptography(mod: NativeModule, session: int) -> None:
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"ec1")
    digest = hashlib.sha256(b"hello p11gate").digest()
    assert mod.call(SIGN_INIT, [session, Mechanism(CKM_ECDSA), priv]) == []
    assert mod.call(SIGN, [session, digest, 0]) == [Null(64)]  # size query keeps the operation
    assert mod.call(SIGN, [session, digest, 10]) == [Null(64)]  # CKR_BUFFER_TOO_SMALL as data
    (sig,) = mod.call(SIGN, [session, digest, 64])
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    ec_public_key(mod, session, b"ec1").verify(der, b"hello p11gate", ec.ECDSA(hashes.SHA256()))
    # and the token verifies it too
    pub = find_one(mod, session, CKO_PUBLIC_KEY, b"ec1")
    mod.call(VERIFY_INIT, [session, Mechanism(CKM_ECDSA), pub])
    assert mod.call(VERIFY, [session, digest, sig]) == []
    mod.call(VERIFY_INIT, [session, Mechanism(CKM_ECDSA), pub])
    with pytest.raises(Pkcs11Error) as e:
        mod.call(VERIFY, [session, digest, bytes(64)])
    assert e.value.rv == ckr.SIGNATURE_INVALID


def test_sign_rsa_pss_and_verify_with_cryptography(mod: NativeModule, session: int) -> None:
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"rsa1")
    pub = find_one(mod, session, CKO_PUBLIC_KEY, b"rsa1")
    mech = Mechanism(CKM_SHA256_RSA_PKCS_PSS, PssParams(CKM_SHA256, CKG_MGF1_SHA256, 32))
    mod.call(SIGN_INIT, [session, mech, priv])
    # a capacity far above the cap is clamped, not allocated
    (sig,) = mod.call(SIGN, [session, b"message", 0xFFFFFFFE])
    assert len(sig) == 256
    modulus, exponent = attr_values(mod, session, pub, CKA_MODULUS, CKA_PUBLIC_EXPONENT)
    key = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    key.public_key().verify(
        sig,
        b"message",
        apad.PSS(mgf=apad.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def test_rsa_oaep_decrypt(mod: NativeModule, session: int) -> None:
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"rsa1")
    pub = find_one(mod, session, CKO_PUBLIC_KEY, b"rsa1")
    modulus, exponent = attr_values(mod, session, pub, CKA_MODULUS, CKA_PUBLIC_EXPONENT)
    key = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    # SoftHSM 2.6 implements OAEP with SHA-1 only
    ct = key.public_key().encrypt(
        b"secret", apad.OAEP(apad.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    )
    mech = Mechanism(
        CKM_RSA_PKCS_OAEP, OaepParams(CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, None)
    )
    mod.call(DECRYPT_INIT, [session, mech, priv])
    assert mod.call(DECRYPT, [session, ct, 256]) == [b"secret"]


# ------------------------------------------------------------------ symmetric


def test_aes_cbc_pad(mod: NativeModule, session: int) -> None:
    key = aes_key(mod, session)
    (value,) = attr_values(mod, session, key, CKA_VALUE)
    iv = bytes(range(16))
    data = b"attack at dawn, again and again"
    mech = Mechanism(CKM_AES_CBC_PAD, IvParams(iv))
    mod.call(ENCRYPT_INIT, [session, mech, key])
    (ct,) = mod.call(ENCRYPT, [session, data, 64])
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    assert ct == enc.update(padder.update(data) + padder.finalize()) + enc.finalize()
    mod.call(DECRYPT_INIT, [session, mech, key])
    assert mod.call(DECRYPT, [session, ct, len(ct)]) == [data]

    # multi-part; C_EncryptFinal with a non-NULL empty buffer (fy = 0xffffffff) is told
    # it needs 16 bytes, then gets them
    mod.call(ENCRYPT_INIT, [session, mech, key])
    (part,) = mod.call(ENCRYPT_UPDATE, [session, data, 64])
    assert mod.call(ENCRYPT_FINAL, [session, 0xFFFFFFFF]) == [Null(16)]
    (last,) = mod.call(ENCRYPT_FINAL, [session, 16])
    assert part + last == ct


def test_aes_gcm(mod: NativeModule, session: int) -> None:
    key = aes_key(mod, session)
    (value,) = attr_values(mod, session, key, CKA_VALUE)
    iv, aad = b"\x01" * 12, b"header"
    mech = Mechanism(CKM_AES_GCM, GcmParams(iv, 96, aad, 128))
    mod.call(ENCRYPT_INIT, [session, mech, key])
    (ct,) = mod.call(ENCRYPT, [session, b"gcm plaintext", 64])
    assert ct == AESGCM(value).encrypt(iv, b"gcm plaintext", aad)
    mod.call(DECRYPT_INIT, [session, mech, key])
    assert mod.call(DECRYPT, [session, ct, 64]) == [b"gcm plaintext"]


def test_aes_ctr(mod: NativeModule, session: int) -> None:
    key = aes_key(mod, session)
    (value,) = attr_values(mod, session, key, CKA_VALUE)
    cb = bytes(15) + b"\x01"
    mod.call(ENCRYPT_INIT, [session, Mechanism(CKM_AES_CTR, CtrParams(128, cb)), key])
    (ct,) = mod.call(ENCRYPT, [session, b"counter mode!", 64])
    enc = Cipher(algorithms.AES(value), modes.CTR(cb)).encryptor()
    assert ct == enc.update(b"counter mode!") + enc.finalize()


def test_digest(mod: NativeModule, session: int) -> None:
    mod.call(DIGEST_INIT, [session, Mechanism(CKM_SHA256)])
    assert mod.call(DIGEST, [session, b"abc", 0]) == [Null(32)]
    assert mod.call(DIGEST, [session, b"abc", 32]) == [hashlib.sha256(b"abc").digest()]
    mod.call(DIGEST_INIT, [session, Mechanism(CKM_SHA256)])
    mod.call(DIGEST_UPDATE, [session, b"a"])
    mod.call(DIGEST_UPDATE, [session, b"bc"])
    assert mod.call(DIGEST_FINAL, [session, 0]) == [Null(32)]
    assert mod.call(DIGEST_FINAL, [session, 64]) == [hashlib.sha256(b"abc").digest()]


def test_wrap_unwrap(mod: NativeModule, session: int) -> None:
    kek = aes_key(mod, session)
    target = aes_key(mod, session)
    (target_value,) = attr_values(mod, session, target, CKA_VALUE)
    mech = Mechanism(CKM_AES_KEY_WRAP)
    assert mod.call(WRAP_KEY, [session, mech, kek, target, 0]) == [Null(40)]
    (wrapped,) = mod.call(WRAP_KEY, [session, mech, kek, target, 40])
    assert len(wrapped) == 40
    template = [
        A(CKA_CLASS, CKO_SECRET_KEY),
        A(CKA_KEY_TYPE, CKK_AES),
        A(CKA_TOKEN, False),
        A(CKA_SENSITIVE, False),
        A(CKA_EXTRACTABLE, True),
    ]
    (unwrapped,) = mod.call(UNWRAP_KEY, [session, mech, kek, wrapped, template])
    assert unwrapped != target
    assert attr_values(mod, session, unwrapped, CKA_VALUE) == [target_value]


def test_derive_ecdh1_via_derive_key2(mod: NativeModule, session: int) -> None:
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"ec1")
    peer = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    peer_point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    mech = Mechanism(CKM_ECDH1_DERIVE, Ecdh1Params(CKD_NULL, None, peer_point))
    template = [
        A(CKA_CLASS, CKO_SECRET_KEY),
        A(CKA_KEY_TYPE, CKK_GENERIC_SECRET),
        A(CKA_VALUE_LEN, 32),
        A(CKA_TOKEN, False),
        A(CKA_SENSITIVE, False),
        A(CKA_EXTRACTABLE, True),
    ]
    rv, update, handle = mod.call(DERIVE_KEY2, [session, mech, priv, template])
    assert rv == ckr.OK and update == ParamUpdate(True)
    (secret,) = attr_values(mod, session, handle, CKA_VALUE)
    assert secret == peer.exchange(ec.ECDH(), ec_public_key(mod, session, b"ec1"))


# ------------------------------------------------------------------ errors and edges


def test_pkcs11_3_calls_not_supported(mod: NativeModule, session: int) -> None:
    for call_id, args in (
        (LOGIN_USER, [session, 1, b"1234", b"user"]),
        (MESSAGE_ENCRYPT_INIT, [session, Mechanism(CKM_AES_GCM), 1]),
        (SIGN_MESSAGE_NEXT, [session, b"", b"data", 1, 64]),
    ):
        with pytest.raises(Pkcs11Error) as e:
            mod.call(call_id, args)
        assert e.value.rv == ckr.FUNCTION_NOT_SUPPORTED


def test_wait_for_slot_event(mod: NativeModule) -> None:
    # SoftHSM does not implement it; what matters is that the call is wired (NULL pReserved)
    with pytest.raises(Pkcs11Error) as e:
        mod.call(WAIT_FOR_SLOT_EVENT, [1])  # CKF_DONT_BLOCK
    assert e.value.rv in (ckr.FUNCTION_NOT_SUPPORTED, ckr.NO_EVENT)


def test_errors_raise_pkcs11error(mod: NativeModule, session: int) -> None:
    with pytest.raises(Pkcs11Error) as e:
        mod.call(LOGIN, [session, 1, b"0000"])
    assert e.value.rv in (ckr.USER_ALREADY_LOGGED_IN, ckr.PIN_INCORRECT)
    with pytest.raises(Pkcs11Error) as e:
        mod.call(SIGN, [session, b"x", 64])
    assert e.value.rv == ckr.OPERATION_NOT_INITIALIZED


@pytest.mark.parametrize(
    ("call_id", "args"),
    [
        (ENCRYPT, ["not a handle", b"x", 10]),
        (ENCRYPT, [1, "not bytes", 10]),
        (ENCRYPT, [1, b"x", -5]),
        (ENCRYPT, [1, b"x"]),
        (ENCRYPT, [1, Null(100), 10]),  # NULL data with a length
        (GET_SESSION_INFO, [1 << 70]),
        (CREATE_OBJECT, [1, [Attribute(CKA_LABEL, object(), 1)]]),
        (CREATE_OBJECT, [1, [Attribute(CKA_SIGN, 300, 1)]]),
        (CREATE_OBJECT, [1, [("too", "short")]]),
        (GET_ATTR, [1, 1, [AttrRequest(CKA_LABEL, -1)]]),
        (SIGN_INIT, [1, "mechanism", 1]),
    ],
)
def test_hostile_values_are_arguments_bad(mod: NativeModule, call_id: int, args: list[Any]) -> None:
    with pytest.raises(Pkcs11Error) as e:
        mod.call(call_id, args)
    assert e.value.rv == ckr.ARGUMENTS_BAD


def test_deeply_nested_template_refused(mod: NativeModule, session: int) -> None:
    t: list[Attribute] = [A(CKA_CLASS, CKO_SECRET_KEY)]
    for _ in range(20):
        t = [Attribute(CKA_WRAP_TEMPLATE, t, 24)]
    with pytest.raises(Pkcs11Error) as e:
        mod.call(CREATE_OBJECT, [session, t])
    assert e.value.rv == ckr.ARGUMENTS_BAD


def test_unknown_call_ids(mod: NativeModule) -> None:
    for call_id in (0, 1, 2, 90, 12345, -1):
        with pytest.raises(Pkcs11Error) as e:
            mod.call(call_id, [])
        assert e.value.rv == ckr.FUNCTION_NOT_SUPPORTED


def test_max_buffer_clamps(token: dict[str, Any], mod: NativeModule, session: int) -> None:
    small = NativeModule(token["module"], max_buffer=16)  # same process-wide module
    (data,) = small.call(GENERATE_RANDOM, [session, 1000])
    assert len(data) == 16
    priv = find_one(mod, session, CKO_PRIVATE_KEY, b"ec1")
    small.call(SIGN_INIT, [session, Mechanism(CKM_ECDSA), priv])
    assert small.call(SIGN, [session, bytes(32), 1000]) == [Null(64)]  # clamped → too small
    mod.call(SIGN, [session, bytes(32), 64])  # finish the operation


def test_init_token_labels_are_padded(mod: NativeModule, token: dict[str, Any]) -> None:
    def free_slot() -> int:
        for s in mod.call(GET_SLOT_LIST, [1, 16])[0]:
            if not mod.call(GET_TOKEN_INFO, [s])[4] & 0x400:  # not CKF_TOKEN_INITIALIZED
                return int(s)
        raise AssertionError("no free slot")

    s = free_slot()
    assert mod.call(INIT_TOKEN, [s, b"5678", b"second"]) == []  # `z` label
    assert mod.call(GET_TOKEN_INFO, [s])[0] == b"second".ljust(32)
    # SoftHSM offers a new free slot only after re-initialization: re-initialize this one
    assert mod.call(INIT_TOKEN2, [s, b"5678", b"third".ljust(32)]) == []  # `s` label
    assert mod.call(GET_TOKEN_INFO, [s])[0] == b"third".ljust(32)


OPENSC = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"


@pytest.mark.skipif(not os.path.exists(OPENSC), reason="OpenSC not installed")
def test_pkcs11_3_interface_through_c_getinterface() -> None:
    # OpenSC exports C_GetInterface with a 3.0 function list: the 3.0 calls reach it
    m = NativeModule(OPENSC)
    assert m.interface_version >= (3, 0)
    assert m.supports(LOGIN_USER) and m.supports(67)  # C_SessionCancel
    m.initialize()
    try:
        assert m.call(GET_INFO, [])[0] >= (3, 0)
        with pytest.raises(Pkcs11Error) as e:
            m.call(67, [0xDEAD, 0])  # C_SessionCancel on no session
        assert e.value.rv == ckr.SESSION_HANDLE_INVALID
    finally:
        m.finalize()

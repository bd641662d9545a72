"""SoftBackend semantics, called directly: login states, output buffers, mechanisms,
objects and attributes, exactly as PKCS#11 says."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.soft.helpers import SO_PIN, USER_PIN, Driver, cid, initialised, soft_config

from p11gate.backends.soft import mechanisms as M
from p11gate.codec import ckr
from p11gate.codec.values import (
    Attribute,
    AttrRequest,
    GcmParams,
    IvParams,
    Mechanism,
    Null,
    PssParams,
)

P256 = bytes.fromhex("06082a8648ce3d030107")
P384 = bytes.fromhex("06052b81040022")
RW = 6


def A(t: int, v: int | bytes) -> Attribute:
    return Attribute(t, v, 1 if isinstance(v, int) else len(v))


@pytest.fixture()
def d(tmp_path: Path) -> Iterator[Driver]:
    drv = initialised(tmp_path / "t.db")
    yield drv
    drv.close()


def user_session(d: Driver) -> int:
    (s,) = d("C_OpenSession", 1, RW)
    d("C_Login", s, 1, USER_PIN)
    return s


def ec_pair(d: Driver, s: int, params: bytes = P256, token: int = 0) -> tuple[int, int]:
    pub, priv = d("C_GenerateKeyPair", s, Mechanism(M.CKM_EC_KEY_PAIR_GEN),
                  [A(0x1, token), A(0x180, params)], [A(0x1, token), A(0x102, b"e")])
    return pub, priv


def ec_public(d: Driver, s: int, pub: int, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    (attrs, rv) = d("C_GetAttributeValue", s, pub, [AttrRequest(0x181, 200)])
    assert rv == 0
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, attrs[0].value[2:])


def test_slot_token_and_mechanisms(d: Driver) -> None:
    assert d("C_GetSlotList", 1, 0) == [Null(1)]
    assert d("C_GetSlotList", 1, 4) == [[1]]
    info = d("C_GetTokenInfo", 1)
    assert info[0].rstrip() == b"unit" and info[4] & 0x40C == 0x40C
    (n,) = d("C_GetMechanismList", 1, 0)
    assert n == Null(len(M.MECHANISMS))
    (mechs,) = d("C_GetMechanismList", 1, 64)
    assert set(mechs) == set(M.MECHANISMS)
    assert d("C_GetMechanismInfo", 1, M.CKM_RSA_PKCS_KEY_PAIR_GEN)[:2] == [2048, 4096]
    assert d.rv("C_GetMechanismInfo", 1, 0x210) == ckr.MECHANISM_INVALID  # MD5
    assert d.rv("C_GetTokenInfo", 7) == ckr.SLOT_ID_INVALID
    assert d.rv("C_CopyObject", 1, 1, []) == ckr.FUNCTION_NOT_SUPPORTED
    assert d.rv("C_SeedRandom", 1, b"x") == ckr.RANDOM_SEED_NOT_SUPPORTED


def test_login_states(d: Driver) -> None:
    (ro,) = d("C_OpenSession", 1, 4)
    assert d.rv("C_Login", ro, 1, b"bad-pin") == ckr.PIN_INCORRECT
    assert d.rv("C_Login", ro, 0, SO_PIN) == ckr.SESSION_READ_ONLY_EXISTS
    assert d.rv("C_Login", ro, 9, USER_PIN) == ckr.USER_TYPE_INVALID
    assert d.rv("C_Logout", ro) == ckr.USER_NOT_LOGGED_IN
    d("C_Login", ro, 1, USER_PIN)
    assert d.rv("C_Login", ro, 1, USER_PIN) == ckr.USER_ALREADY_LOGGED_IN
    # the RO session counts first, as on SoftHSM (tests/soft/test_pins.py)
    assert d.rv("C_Login", ro, 0, SO_PIN) == ckr.SESSION_READ_ONLY_EXISTS
    assert d("C_GetSessionInfo", ro)[1] == 1  # CKS_RO_USER_FUNCTIONS
    d("C_Logout", ro)
    assert d.rv("C_Login", 999, 1, USER_PIN) == ckr.SESSION_HANDLE_INVALID
    assert d.rv("C_InitToken", 1, SO_PIN, b"x") == ckr.SESSION_EXISTS
    assert d.rv("C_InitPIN", ro, b"123456") == ckr.USER_NOT_LOGGED_IN
    d("C_CloseSession", ro)
    (rw,) = d("C_OpenSession", 1, RW)
    d("C_Login", rw, 1, USER_PIN)
    d("C_SetPIN", rw, USER_PIN, b"new-user-pin")
    d("C_Logout", rw)
    assert d.rv("C_Login", rw, 1, USER_PIN) == ckr.PIN_INCORRECT
    d("C_Login", rw, 1, b"new-user-pin")
    d("C_CloseAllSessions", 1)
    assert d.rv("C_InitToken", 1, b"wrong-so-pin", b"x") == ckr.PIN_INCORRECT


def test_fresh_token_needs_init(tmp_path: Path) -> None:
    d = Driver(soft_config(tmp_path / "new.db"))
    assert not d("C_GetTokenInfo", 1)[4] & 0x400
    (s,) = d("C_OpenSession", 1, RW)
    assert d.rv("C_Login", s, 1, USER_PIN) == ckr.USER_PIN_NOT_INITIALIZED
    d("C_CloseSession", s)
    assert d.rv("C_InitToken", 1, b"12", b"x") == ckr.PIN_LEN_RANGE
    d("C_InitToken", 1, SO_PIN, b"fresh")
    (s,) = d("C_OpenSession", 1, RW)
    assert d.rv("C_Login", s, 1, USER_PIN) == ckr.USER_PIN_NOT_INITIALIZED
    d.close()


def test_ecdsa_buffers_and_multipart(d: Driver) -> None:
    s = user_session(d)
    pub, priv = ec_pair(d, s)
    assert d.rv("C_Sign", s, b"x" * 32, 64) == ckr.OPERATION_NOT_INITIALIZED
    d("C_SignInit", s, Mechanism(M.CKM_ECDSA), priv)
    assert d.rv("C_SignInit", s, Mechanism(M.CKM_ECDSA), priv) == ckr.OPERATION_ACTIVE
    digest = hashlib.sha256(b"m").digest()
    assert d("C_Sign", s, digest, 0) == [Null(64)]  # size query: still active
    assert d("C_Sign", s, digest, 10) == [Null(64)]  # too small: still active
    (sig,) = d("C_Sign", s, digest, 200)
    assert d.rv("C_Sign", s, digest, 200) == ckr.OPERATION_NOT_INITIALIZED
    key = ec_public(d, s, pub, ec.SECP256R1())
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                    int.from_bytes(sig[32:], "big")),
               digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    d("C_SignInit", s, Mechanism(M.CKM_ECDSA_SHA256), priv)
    d("C_SignUpdate", s, b"part one, ")
    d("C_SignUpdate", s, b"part two")
    (sig,) = d("C_SignFinal", s, 64)
    key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                    int.from_bytes(sig[32:], "big")),
               b"part one, part two", ec.ECDSA(hashes.SHA256()))
    d("C_VerifyInit", s, Mechanism(M.CKM_ECDSA_SHA256), pub)
    d("C_Verify", s, b"part one, part two", sig)
    d("C_VerifyInit", s, Mechanism(M.CKM_ECDSA_SHA256), pub)
    assert d.rv("C_Verify", s, b"tampered", sig) == ckr.SIGNATURE_INVALID
    d("C_VerifyInit", s, Mechanism(M.CKM_ECDSA_SHA256), pub)
    assert d.rv("C_Verify", s, b"x", sig[:10]) == ckr.SIGNATURE_LEN_RANGE
    assert d.rv("C_SignInit", s, Mechanism(M.CKM_RSA_PKCS), priv) == ckr.KEY_TYPE_INCONSISTENT
    assert d.rv("C_SignInit", s, Mechanism(0x1047), priv) == ckr.MECHANISM_INVALID
    assert d.rv("C_SignInit", s, Mechanism(M.CKM_ECDSA), pub) in (
        ckr.KEY_FUNCTION_NOT_PERMITTED, ckr.KEY_TYPE_INCONSISTENT)
    _p384, k384 = ec_pair(d, s, P384)
    d("C_SignInit", s, Mechanism(M.CKM_ECDSA), k384)
    assert len(d("C_Sign", s, hashlib.sha384(b"m").digest(), 200)[0]) == 96
    assert d.rv("C_GenerateKeyPair", s, Mechanism(M.CKM_EC_KEY_PAIR_GEN),
                [A(0x180, b"\x06\x03\x2b\x65\x70")], []) == ckr.CURVE_NOT_SUPPORTED


def test_rsa_mechanisms(d: Driver) -> None:
    s = user_session(d)
    pub, priv = d("C_GenerateKeyPair", s, Mechanism(M.CKM_RSA_PKCS_KEY_PAIR_GEN),
                  [A(0x121, 2048)], [A(0x102, b"r")])
    attrs, _rv = d("C_GetAttributeValue", s, pub, [AttrRequest(0x120, 512),
                                                  AttrRequest(0x122, 16)])
    key = rsa.RSAPublicNumbers(int.from_bytes(attrs[1].value, "big"),
                               int.from_bytes(attrs[0].value, "big")).public_key()
    msg = b"rsa message"
    d("C_SignInit", s, Mechanism(M.CKM_SHA256_RSA_PKCS), priv)
    (sig,) = d("C_Sign", s, msg, 256)
    key.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(msg).digest()
    d("C_SignInit", s, Mechanism(M.CKM_RSA_PKCS), priv)
    (raw,) = d("C_Sign", s, info, 256)
    assert raw == sig  # PKCS#1 v1.5 is deterministic
    pss = PssParams(M.CKM_SHA256, M.CKG_MGF1_SHA256, 32)
    d("C_SignInit", s, Mechanism(M.CKM_SHA256_RSA_PKCS_PSS, pss), priv)
    (sig,) = d("C_Sign", s, msg, 256)
    key.verify(sig, msg, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    d("C_SignInit", s, Mechanism(M.CKM_RSA_PKCS_PSS, pss), priv)
    (sig,) = d("C_Sign", s, hashlib.sha256(msg).digest(), 256)
    d("C_VerifyInit", s, Mechanism(M.CKM_SHA256_RSA_PKCS_PSS, pss), pub)
    d("C_Verify", s, msg, sig)
    assert d.rv("C_SignInit", s, Mechanism(M.CKM_RSA_PKCS_PSS), priv) == \
        ckr.MECHANISM_PARAM_INVALID
    assert d.rv("C_GenerateKeyPair", s, Mechanism(M.CKM_RSA_PKCS_KEY_PAIR_GEN),
                [A(0x121, 1024)], []) == ckr.KEY_SIZE_RANGE


def test_aes_digest_random(d: Driver) -> None:
    s = user_session(d)
    (k,) = d("C_GenerateKey", s, Mechanism(M.CKM_AES_KEY_GEN),
             [A(0x161, 32), A(0x104, 1), A(0x105, 1)])
    tok = d.backend._token
    assert tok is not None
    value = tok.key_value(tok.objects[k])
    iv = b"\x07" * 16
    d("C_EncryptInit", s, Mechanism(M.CKM_AES_CBC_PAD, IvParams(iv)), k)
    assert d("C_Encrypt", s, b"hello", 0) == [Null(16)]
    (ct,) = d("C_Encrypt", s, b"hello", 16)
    dec = Cipher(algorithms.AES(value), modes.CBC(iv)).decryptor()
    assert (dec.update(ct) + dec.finalize())[:5] == b"hello"
    d("C_DecryptInit", s, Mechanism(M.CKM_AES_CBC_PAD, IvParams(iv)), k)
    assert d("C_Decrypt", s, ct, 0) == [Null(5)]
    assert d("C_Decrypt", s, ct, 64) == [b"hello"]
    g = GcmParams(b"\x01" * 12, 96, b"aad", 128)
    d("C_EncryptInit", s, Mechanism(M.CKM_AES_GCM, g), k)
    (ct,) = d("C_Encrypt", s, b"gcm data", 64)
    assert AESGCM(value).decrypt(b"\x01" * 12, ct, b"aad") == b"gcm data"
    d("C_DecryptInit", s, Mechanism(M.CKM_AES_GCM, g), k)
    assert d.rv("C_Decrypt", s, ct[:-1] + bytes([ct[-1] ^ 1]), 64) == \
        ckr.ENCRYPTED_DATA_INVALID
    d("C_DigestInit", s, Mechanism(M.CKM_SHA256))
    d("C_DigestUpdate", s, b"ab")
    assert d("C_DigestFinal", s, 0) == [Null(32)]
    assert d("C_DigestFinal", s, 32) == [hashlib.sha256(b"ab").digest()]
    assert len(d("C_GenerateRandom", s, 48)[0]) == 48
    attrs, rv = d("C_GetAttributeValue", s, k, [AttrRequest(0x11, 32), AttrRequest(0x161, 8)])
    assert rv == ckr.ATTRIBUTE_SENSITIVE and attrs[1].value == 32
    assert d.rv("C_GenerateKey", s, Mechanism(M.CKM_AES_KEY_GEN), [A(0x161, 20)]) == \
        ckr.KEY_SIZE_RANGE


def test_objects_attributes_and_visibility(d: Driver) -> None:
    (ro,) = d("C_OpenSession", 1, 4)
    assert d.rv("C_CreateObject", ro, [A(0, 0), A(1, 1), A(2, 0)]) == ckr.SESSION_READ_ONLY
    (pub_data,) = d("C_CreateObject", ro, [A(0, 0), A(3, b"public data"), A(0x11, b"v")])
    assert d.rv("C_CreateObject", ro, [A(0, 0), A(2, 1)]) == ckr.USER_NOT_LOGGED_IN
    s = user_session(d)
    (priv_data,) = d("C_CreateObject", s, [A(0, 0), A(1, 1), A(2, 1), A(3, b"secret data")])
    (cert,) = d("C_CreateObject", s, [A(0, 1), A(1, 1), A(0x80, 0), A(0x11, b"\x30\x00"),
                                      A(0x102, b"c1"), A(3, b"cert")])
    (aes,) = d("C_CreateObject", s, [A(0, 4), A(0x100, 0x1F), A(0x11, b"k" * 16)])
    assert d.rv("C_CreateObject", s, [A(0, 3), A(0x100, 3)]) == ckr.TEMPLATE_INCONSISTENT
    assert d.rv("C_CreateObject", s, [A(0, 0), A(0x108, 1)]) == ckr.ATTRIBUTE_TYPE_INVALID
    assert d.rv("C_CreateObject", s, [A(3, b"no class")]) == ckr.TEMPLATE_INCOMPLETE
    assert d.rv("C_CreateObject", s, [A(0, 4), A(0x100, 0x1F), A(0x11, b"k" * 16),
                                      A(0x103, 0)]) == ckr.TEMPLATE_INCONSISTENT
    # size queries, too small, invalid type
    attrs, rv = d("C_GetAttributeValue", s, cert, [AttrRequest(3, 0), AttrRequest(0x102, 1),
                                                   AttrRequest(0x11, 2)])
    assert rv == ckr.BUFFER_TOO_SMALL
    assert attrs[0] == Attribute(3, None, 4) and attrs[1].length is None
    assert attrs[2].value == b"\x30\x00"
    attrs, rv = d("C_GetAttributeValue", s, cert, [AttrRequest(0x120, 64)])
    assert rv == ckr.ATTRIBUTE_TYPE_INVALID and attrs[0].length is None
    d("C_SetAttributeValue", s, cert, [A(3, b"renamed"), A(0x102, b"c2")])
    assert d.rv("C_SetAttributeValue", s, cert, [A(0, 4)]) == ckr.ATTRIBUTE_READ_ONLY
    d("C_FindObjectsInit", s, [A(0x102, b"c2")])
    assert d("C_FindObjects", s, 10) == [[cert]]
    assert d.rv("C_FindObjectsInit", s, []) == ckr.OPERATION_ACTIVE
    d("C_FindObjectsFinal", s)
    d("C_FindObjectsInit", s, [])
    (everything,) = d("C_FindObjects", s, 100)
    assert {pub_data, priv_data, cert, aes} <= set(everything)
    d("C_FindObjectsFinal", s)
    d("C_Logout", s)
    d("C_FindObjectsInit", s, [])
    (public,) = d("C_FindObjects", s, 100)
    d("C_FindObjectsFinal", s)
    assert pub_data in public and cert in public and priv_data not in public
    assert aes not in public
    assert d.rv("C_GetAttributeValue", s, priv_data, [AttrRequest(3, 0)]) == \
        ckr.OBJECT_HANDLE_INVALID
    # session objects end with their session; token objects stay
    d("C_CloseSession", ro)
    assert d.rv("C_GetAttributeValue", s, pub_data, [AttrRequest(3, 0)]) == \
        ckr.OBJECT_HANDLE_INVALID
    d("C_DestroyObject", s, cert)
    assert d.rv("C_DestroyObject", s, cert) == ckr.OBJECT_HANDLE_INVALID


def test_public_key_import_verifies(d: Driver) -> None:
    s = user_session(d)
    key = ec.generate_private_key(ec.SECP256R1())
    (pub,) = d("C_CreateObject", s, [A(0, 2), A(0x100, 3), A(0x180, P256),
                                     A(0x181, M.ec_point(key.public_key()))])
    msg = b"signed elsewhere"
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, sv = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
    d("C_VerifyInit", s, Mechanism(M.CKM_ECDSA_SHA256), pub)
    d("C_Verify", s, msg, r.to_bytes(32, "big") + sv.to_bytes(32, "big"))


def test_rsa_keygen_does_not_block_the_loop(tmp_path: Path) -> None:
    import asyncio
    import time

    d = initialised(tmp_path / "k.db")
    s = user_session(d)
    b = d.backend

    async def race() -> tuple[float, float]:
        t0 = time.monotonic()
        gen = asyncio.ensure_future(b.call(cid("C_GenerateKeyPair"), [
            s, Mechanism(M.CKM_RSA_PKCS_KEY_PAIR_GEN), [A(0x121, 4096)], []]))
        await asyncio.sleep(0.01)
        info = await b.call(cid("C_GetTokenInfo"), [1])
        t_info = time.monotonic() - t0
        assert info[0].rstrip() == b"unit"
        await gen
        return t_info, time.monotonic() - t0

    t_info, t_gen = d.loop.run_until_complete(race())
    d.close()
    assert t_info < t_gen and t_info < 0.5, (t_info, t_gen)

"""AES ECB, CBC, CBC-PAD, CTR and GCM on the soft token against `cryptography`, one
part and many, output-size queries, and parameter errors."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.soft.mech_driver import CKK_GENERIC, Tok

from p11gate.codec import ckr
from p11gate.codec.values import CtrParams, GcmParams, IvParams, Mechanism, Null

KEY = bytes(range(32))
IV = bytes(range(16, 32))
DATA = os.urandom(100)
BLOCKS = os.urandom(96)


def _ref(mode: modes.Mode, data: bytes, pad: bool = False) -> bytes:
    if pad:
        p = padding.PKCS7(128).padder()
        data = p.update(data) + p.finalize()
    e = Cipher(algorithms.AES(KEY), mode).encryptor()
    return e.update(data) + e.finalize()


CASES = {
    "ECB": (0x1081, None, lambda: modes.ECB(), BLOCKS, False),
    "CBC": (0x1082, IvParams(IV), lambda: modes.CBC(IV), BLOCKS, False),
    "CBC-PAD": (0x1085, IvParams(IV), lambda: modes.CBC(IV), DATA, True),
    "CTR": (0x1086, CtrParams(128, IV), lambda: modes.CTR(IV), DATA, False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("parts", [1, 7])
def test_ciphers_match_cryptography(tok: Tok, name: str, parts: int) -> None:
    mech, param, mode, data, pad = CASES[name]
    k = tok.secret(KEY)
    expected = _ref(mode(), data, pad)
    assert tok.crypt("Encrypt", mech, k, data, param, parts) == expected
    assert tok.crypt("Decrypt", mech, k, expected, param, parts) == data


def test_gcm_both_ways(tok: Tok) -> None:
    k = tok.secret(KEY)
    nonce, aad = os.urandom(12), b"header"
    p = GcmParams(nonce, 96, aad, 128)
    ct = tok.crypt("Encrypt", 0x1087, k, DATA, p, parts=4)
    assert ct == AESGCM(KEY).encrypt(nonce, DATA, aad)
    assert tok.crypt("Decrypt", 0x1087, k, ct, p, parts=3) == DATA
    theirs = AESGCM(KEY).encrypt(nonce, b"theirs", aad)
    assert tok.crypt("Decrypt", 0x1087, k, theirs, p) == b"theirs"
    # a shorter tag and a long IV
    iv = os.urandom(60)
    short = GcmParams(iv, 480, None, 96)
    ct = tok.crypt("Encrypt", 0x1087, k, DATA, short)
    d = Cipher(algorithms.AES(KEY), modes.GCM(iv, ct[-12:], min_tag_length=12)).decryptor()
    assert d.update(ct[:-12]) + d.finalize() == DATA
    tok("C_DecryptInit", Mechanism(0x1087, p), k)
    assert tok.rv("C_Decrypt", ct[:-1] + bytes([ct[-1] ^ 1]), 4096) == ckr.ENCRYPTED_DATA_INVALID
    bad = {
        "huge tag": GcmParams(nonce, 96, None, 1 << 40),
        "tag 8 bits": GcmParams(nonce, 96, None, 8),
        "no iv": GcmParams(None, 0, None, 128),
        "huge iv": GcmParams(os.urandom(4096), 4096 * 8, None, 128),
        "iv bits lie": GcmParams(nonce, 1 << 40, None, 128),
        "raw bytes": b"\0" * 40,
    }
    for why, bp in bad.items():
        assert tok.rv("C_EncryptInit", Mechanism(0x1087, bp), k) == ckr.MECHANISM_PARAM_INVALID, why


def test_size_queries_keep_the_operation(tok: Tok) -> None:
    k = tok.secret(KEY)
    tok("C_EncryptInit", Mechanism(0x1085, IvParams(IV)), k)
    (n,) = tok("C_EncryptUpdate", DATA[:40], 0)
    assert n == Null(32)  # two whole blocks out, 8 bytes held
    assert tok("C_EncryptUpdate", DATA[:40], 5) == [Null(32)]  # too small: the length
    (out,) = tok("C_EncryptUpdate", DATA[:40], 64)
    (n,) = tok("C_EncryptFinal", 0)
    (tail,) = tok("C_EncryptFinal", n.length)
    assert out + tail == _ref(modes.CBC(IV), DATA[:40], True)
    tok("C_EncryptInit", Mechanism(0x1081), k)
    (n,) = tok("C_Encrypt", BLOCKS, 0)
    assert n == Null(96)
    (ct,) = tok("C_Encrypt", BLOCKS, 96)
    assert ct == _ref(modes.ECB(), BLOCKS)


def test_aes_errors(tok: Tok) -> None:
    k = tok.secret(KEY)
    tok("C_EncryptInit", Mechanism(0x1082, IvParams(IV)), k)
    assert tok.rv("C_Encrypt", b"x" * 17, 64) == ckr.DATA_LEN_RANGE
    tok("C_DecryptInit", Mechanism(0x1085, IvParams(IV)), k)
    assert tok.rv("C_Decrypt", b"x" * 17, 64) == ckr.ENCRYPTED_DATA_LEN_RANGE
    tok("C_DecryptInit", Mechanism(0x1085, IvParams(IV)), k)
    assert tok.rv("C_Decrypt", bytes(32), 64) == ckr.ENCRYPTED_DATA_INVALID  # bad padding
    bad = {
        "iv short": (0x1082, IvParams(IV[:8])),
        "ecb with a param": (0x1081, b"\0" * 16),
        "ctr counter bits > 128": (0x1086, CtrParams(129, IV)),
        "ctr counter bits 0": (0x1086, CtrParams(0, IV)),
        "ctr no block": (0x1086, CtrParams(64, None)),
        "cbc no iv": (0x1082, None),
    }
    for why, (mech, p) in bad.items():
        assert tok.rv("C_EncryptInit", Mechanism(mech, p), k) == ckr.MECHANISM_PARAM_INVALID, why
    # a counter that would wrap within ulCounterBits is refused, not silently carried
    tok("C_EncryptInit", Mechanism(0x1086, CtrParams(8, bytes(15) + b"\xfe")), k)
    assert tok.rv("C_Encrypt", bytes(48), 64) == ckr.DATA_LEN_RANGE
    gen = tok.secret(bytes(32), CKK_GENERIC)
    assert tok.rv("C_EncryptInit", Mechanism(0x1081), gen) == ckr.KEY_TYPE_INCONSISTENT
    ro = tok.secret(KEY, encrypt=0)
    assert tok.rv("C_EncryptInit", Mechanism(0x1081), ro) == ckr.KEY_FUNCTION_NOT_PERMITTED
    assert tok.rv("C_EncryptInit", Mechanism(0x1084), k) == ckr.MECHANISM_INVALID  # AES MAC

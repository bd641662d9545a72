"""RSA on the soft token against `cryptography`: PKCS#1 v1.5 (raw and hashed), PSS
(parameters checked), OAEP (SHA-1/SHA-2, label); single-part rules; error codes."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tests.soft.mech_driver import P256, A, Tok

from p11gate.codec import ckr
from p11gate.codec.values import Mechanism, OaepParams, PssParams

MSG = b"the soft token signs this, in parts or at once" * 3
HASHES = {0x220: hashes.SHA1, 0x255: hashes.SHA224, 0x250: hashes.SHA256,
          0x260: hashes.SHA384, 0x270: hashes.SHA512}
MGF = {0x220: 1, 0x255: 5, 0x250: 2, 0x260: 3, 0x270: 4}
PKCS = {0x6: 0x220, 0x46: 0x255, 0x40: 0x250, 0x41: 0x260, 0x42: 0x270}
PSS = {0xE: 0x220, 0x47: 0x255, 0x43: 0x250, 0x44: 0x260, 0x45: 0x270}


def test_pkcs1_v15_raw_and_hashed(tok: Tok) -> None:
    _pub, priv, key = tok.rsa()
    for mech, h in PKCS.items():
        for parts in (1, 3):
            sig = tok.sign(mech, priv, MSG, parts=parts)
            key.verify(sig, MSG, padding.PKCS1v15(), HASHES[h]())
    # raw CKM_RSA_PKCS signs what it is given (a DigestInfo here)
    info = bytes.fromhex("3031300d060960864801650304020105000420") + bytes(32)
    sig = tok.sign(0x1, priv, info)
    assert key.recover_data_from_signature(sig, padding.PKCS1v15(), None) == info
    assert tok.verify_rv(0x1, _pub, info, sig) == ckr.OK
    assert tok.verify_rv(0x40, _pub, MSG, sig) == ckr.SIGNATURE_INVALID
    assert tok.verify_rv(0x40, _pub, MSG, sig[:-1]) == ckr.SIGNATURE_LEN_RANGE
    # raw is single-part; too long for the modulus is DATA_LEN_RANGE
    tok("C_SignInit", Mechanism(0x1), priv)
    assert tok.rv("C_SignUpdate", b"x") == ckr.FUNCTION_NOT_SUPPORTED
    assert tok.rv("C_Sign", b"x", 256) == ckr.OPERATION_NOT_INITIALIZED  # ended
    tok("C_SignInit", Mechanism(0x1), priv)
    assert tok.rv("C_Sign", b"x" * 250, 256) == ckr.DATA_LEN_RANGE


def test_pss_with_every_hash_and_checked_params(tok: Tok) -> None:
    pub, priv, key = tok.rsa()
    for mech, h in PSS.items():
        p = PssParams(h, MGF[h], HASHES[h].digest_size)
        sig = tok.sign(mech, priv, MSG, p, parts=2)
        key.verify(sig, MSG, padding.PSS(padding.MGF1(HASHES[h]()), HASHES[h].digest_size),
                   HASHES[h]())
        assert tok.verify_rv(mech, pub, MSG, sig, p) == ckr.OK
    digest = hashes.Hash(hashes.SHA384())
    digest.update(MSG)
    d = digest.finalize()
    sig = tok.sign(0xD, priv, d, PssParams(0x260, 3, 20))
    key.verify(sig, d, padding.PSS(padding.MGF1(hashes.SHA384()), 20), Prehashed(hashes.SHA384()))
    # signatures made by cryptography verify here, on an imported public key
    mine = rsa.generate_private_key(65537, 2048)
    nums = mine.public_key().public_numbers()
    (imported,) = tok("C_CreateObject", [A(0, 2), A(0x100, 0), A(0x10A, 1),
                                         A(0x120, nums.n.to_bytes(256, "big")),
                                         A(0x122, b"\x01\x00\x01")])
    for mech, h in PSS.items():
        theirs = mine.sign(MSG, padding.PSS(padding.MGF1(HASHES[h]()), 10), HASHES[h]())
        assert tok.verify_rv(mech, imported, MSG, theirs, PssParams(h, MGF[h], 10)) == ckr.OK
    for mech, h in PKCS.items():
        theirs = mine.sign(MSG, padding.PKCS1v15(), HASHES[h]())
        assert tok.verify_rv(mech, imported, MSG, theirs) == ckr.OK
    bad = {
        "hash not the mechanism's": (0x43, PssParams(0x220, 1, 20)),
        "unknown hash": (0x43, PssParams(0x999, 2, 32)),
        "unknown mgf": (0x43, PssParams(0x250, 9, 32)),
        "salt too long": (0x43, PssParams(0x250, 2, 1 << 20)),
        "salt too long for the key": (0x43, PssParams(0x250, 2, 256 - 32 - 1)),
        "no params": (0x43, None),
        "raw bytes": (0xD, b"\0" * 24),
    }
    for why, (mech, p) in bad.items():
        assert tok.rv("C_SignInit", Mechanism(mech, p), priv) == ckr.MECHANISM_PARAM_INVALID, why
    tok("C_SignInit", Mechanism(0xD, PssParams(0x250, 2, 32)), priv)
    assert tok.rv("C_Sign", b"short", 256) == ckr.DATA_LEN_RANGE  # not a SHA-256 hash


def test_oaep_and_pkcs_encryption_both_ways(tok: Tok) -> None:
    pub, priv, key = tok.rsa()
    for h in HASHES:
        for label in (None, b"a label"):
            p = OaepParams(h, MGF[h], 1 if label else 0, label)
            pad = padding.OAEP(padding.MGF1(HASHES[h]()), HASHES[h](), label)
            ct = tok.crypt("Encrypt", 0x9, pub, b"secret message", p)
            assert tok.crypt("Decrypt", 0x9, priv, ct, p) == b"secret message"
            assert tok.crypt("Decrypt", 0x9, priv, key.encrypt(b"theirs", pad), p) == b"theirs"
    ct = key.encrypt(b"v1.5", padding.PKCS1v15())
    assert tok.crypt("Decrypt", 0x1, priv, ct) == b"v1.5"
    ct = tok.crypt("Encrypt", 0x1, pub, b"v1.5 here")
    assert tok.crypt("Decrypt", 0x1, priv, ct) == b"v1.5 here"
    # a size query gives the modulus length and keeps the operation
    tok("C_EncryptInit", Mechanism(0x1), pub)
    (n,) = tok("C_Encrypt", b"abc", 0)
    assert n.length == 256
    (ct,) = tok("C_Encrypt", b"abc", 256)
    assert len(ct) == 256
    # errors
    p = OaepParams(0x250, 2, 0, None)
    assert tok.rv("C_EncryptInit", Mechanism(0x9, OaepParams(0x250, 2, 7, None)), pub) \
        == ckr.MECHANISM_PARAM_INVALID
    assert tok.rv("C_EncryptInit", Mechanism(0x9, b"\0" * 8), pub) == ckr.MECHANISM_PARAM_INVALID
    assert tok.rv("C_EncryptInit", Mechanism(0x9, p), priv) == ckr.KEY_FUNCTION_NOT_PERMITTED
    tok("C_DecryptInit", Mechanism(0x9, p), priv)
    assert tok.rv("C_Decrypt", b"\1" * 256, 256) == ckr.ENCRYPTED_DATA_INVALID
    tok("C_DecryptInit", Mechanism(0x9, p), priv)
    assert tok.rv("C_Decrypt", b"\1" * 100, 256) == ckr.ENCRYPTED_DATA_LEN_RANGE
    tok("C_EncryptInit", Mechanism(0x9, p), pub)
    assert tok.rv("C_EncryptUpdate", b"x", 256) == ckr.FUNCTION_NOT_SUPPORTED
    tok("C_EncryptInit", Mechanism(0x9, p), pub)
    assert tok.rv("C_Encrypt", b"x" * 300, 256) == ckr.DATA_LEN_RANGE


@pytest.mark.parametrize("mech", [0x1, 0x40, 0xD, 0x9])
def test_rsa_mechanisms_refuse_other_keys(tok: Tok, mech: int) -> None:
    aes = tok.secret(bytes(32))
    ec_pub, ec_priv = tok.pair(0x1040, [A(0x180, P256)])
    kind = "C_EncryptInit" if mech == 0x9 else "C_SignInit"
    param = PssParams(0x250, 2, 32) if mech == 0xD else (
        OaepParams(0x250, 2, 0, None) if mech == 0x9 else None)
    for key in (aes, ec_priv if kind == "C_SignInit" else ec_pub):
        assert tok.rv(kind, Mechanism(mech, param), key) == ckr.KEY_TYPE_INCONSISTENT

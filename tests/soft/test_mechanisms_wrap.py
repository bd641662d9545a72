"""C_WrapKey / C_UnwrapKey on the soft token: RFC 3394 / 5649 vectors, wrap here and
unwrap with `cryptography` (and back), RSA-OAEP key transport, and the wrap rules."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.hashes import SHA256
from tests.soft.mech_driver import (
    CKK_AES,
    CKK_EC,
    CKK_GENERIC,
    CKO_PRIVATE,
    CKO_SECRET,
    P256,
    A,
    Tok,
)

from p11gate.codec import ckr
from p11gate.codec.values import IvParams, Mechanism, OaepParams

KW, KWP = 0x2109, 0x210A


def _wrap(tok: Tok, mech: int, kek: int, key: int, param: object = None) -> bytes:
    (out,) = tok("C_WrapKey", Mechanism(mech, param), kek, key, 4096)
    return bytes(out)


def _unwrap(tok: Tok, mech: int, kek: int, blob: bytes, tpl: list[A], param: object = None
            ) -> int:
    (h,) = tok("C_UnwrapKey", Mechanism(mech, param), kek, blob, tpl)
    return int(h)


def test_rfc3394_and_rfc5649_vectors(tok: Tok) -> None:
    kek = tok.secret(bytes.fromhex("000102030405060708090A0B0C0D0E0F"), wrap=1, unwrap=1)
    key = tok.secret(bytes.fromhex("00112233445566778899AABBCCDDEEFF"), extractable=1)
    assert _wrap(tok, KW, kek, key).hex().upper() == \
        "1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"  # RFC 3394 §4.1
    kek2 = tok.secret(bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8"),
                      wrap=1)
    key2 = tok.secret(bytes.fromhex("c37b7e6492584340bed12207808941155068f738"),
                      CKK_GENERIC, extractable=1)
    assert _wrap(tok, KWP, kek2, key2).hex() == \
        "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"  # RFC 5649 §6


def test_wrap_here_unwrap_there_and_back(tok: Tok) -> None:
    kek_value, secret = os.urandom(32), os.urandom(32)
    kek = tok.secret(kek_value, wrap=1, unwrap=1)
    key = tok.secret(secret, extractable=1)
    for mech, unwrap in ((KW, keywrap.aes_key_unwrap),
                         (KWP, keywrap.aes_key_unwrap_with_padding)):
        assert unwrap(kek_value, _wrap(tok, mech, kek, key)) == secret
        # the same mechanisms as ciphers over data (C_Encrypt / C_Decrypt)
        blob = tok.crypt("Encrypt", mech, kek, secret[:24])
        assert unwrap(kek_value, blob) == secret[:24]
        assert tok.crypt("Decrypt", mech, kek, blob) == secret[:24]
    # wrapped by cryptography, unwrapped here: usable, and marked as having been outside
    theirs = os.urandom(16)
    blob = keywrap.aes_key_wrap(kek_value, theirs)
    h = _unwrap(tok, KW, kek, blob, [A(0, CKO_SECRET), A(0x100, CKK_AES), A(0x104, 1)])
    assert tok.attr(h, 0x165) == 0 and tok.attr(h, 0x164) == 0 and tok.attr(h, 0x163) == 0
    assert tok.attr(h, 0x161) == 16
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    e = Cipher(algorithms.AES(theirs), modes.ECB()).encryptor()
    assert tok.crypt("Encrypt", 0x1081, h, bytes(16)) == e.update(bytes(16)) + e.finalize()
    # AES-CBC-PAD wrapping too, with the IV
    iv = os.urandom(16)
    blob = _wrap(tok, 0x1085, kek, key, IvParams(iv))
    d = Cipher(algorithms.AES(kek_value), modes.CBC(iv)).decryptor()
    assert (d.update(blob) + d.finalize())[:32] == secret
    # a tampered blob
    assert tok.rv("C_UnwrapKey", Mechanism(KW), kek, blob[:-8] + bytes(8),
                  [A(0, CKO_SECRET), A(0x100, CKK_AES)]) == ckr.WRAPPED_KEY_INVALID


def test_private_key_wrapped_with_padding(tok: Tok) -> None:
    kek_value = os.urandom(32)
    kek = tok.secret(kek_value, wrap=1, unwrap=1)
    pub, priv = tok.pair(0x1040, [A(0x180, P256)], [A(0x162, 1)])
    assert tok.attr(priv, 0x164) == 0  # extractable: never "never extractable"
    der = keywrap.aes_key_unwrap_with_padding(kek_value, _wrap(tok, KWP, kek, priv))
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    h = _unwrap(tok, KWP, kek, keywrap.aes_key_wrap_with_padding(kek_value, der),
                [A(0, CKO_PRIVATE), A(0x100, CKK_EC), A(0x108, 1)])
    assert tok.attr(h, 0x180) == P256 and tok.attr(h, 0x165) == 0
    sig = tok.sign(0x1044, h, b"m")
    assert tok.verify_rv(0x1044, pub, b"m", sig) == ckr.OK
    assert tok.rv("C_WrapKey", Mechanism(KW), kek, priv, 4096) == ckr.KEY_NOT_WRAPPABLE


def test_rsa_oaep_key_transport(tok: Tok) -> None:
    pub, priv, rsa_pub = tok.rsa()
    secret = os.urandom(32)
    key = tok.secret(secret, extractable=1)
    p = OaepParams(0x250, 2, 0, None)
    blob = rsa_pub.encrypt(secret, padding.OAEP(padding.MGF1(SHA256()), SHA256(), None))
    h = _unwrap(tok, 0x9, priv, blob, [A(0, CKO_SECRET), A(0x100, CKK_AES)], p)
    assert tok.attr(h, 0x161) == 32
    assert len(_wrap(tok, 0x9, pub, key, p)) == 256
    assert len(_wrap(tok, 0x1, pub, key)) == 256


def test_wrap_rules(tok: Tok) -> None:
    kek = tok.secret(os.urandom(32), wrap=1, unwrap=1)
    plain_kek = tok.secret(os.urandom(32))
    locked = tok.secret(os.urandom(32))
    ext = tok.secret(os.urandom(32), extractable=1)
    trusted_only = tok.secret(os.urandom(32), extractable=1, wrap_with_trusted=1)
    gen = tok.secret(os.urandom(32), CKK_GENERIC, wrap=1)
    assert tok.rv("C_WrapKey", Mechanism(KW), kek, locked, 4096) == ckr.KEY_UNEXTRACTABLE
    assert tok.rv("C_WrapKey", Mechanism(KW), plain_kek, ext, 4096) \
        == ckr.KEY_FUNCTION_NOT_PERMITTED
    assert tok.rv("C_WrapKey", Mechanism(KW), kek, trusted_only, 4096) == ckr.KEY_NOT_WRAPPABLE
    assert tok.rv("C_WrapKey", Mechanism(KW), gen, ext, 4096) \
        == ckr.WRAPPING_KEY_TYPE_INCONSISTENT
    assert tok.rv("C_WrapKey", Mechanism(KW, b"\1" * 8), kek, ext, 4096) \
        == ckr.MECHANISM_PARAM_INVALID
    assert tok.rv("C_WrapKey", Mechanism(0x1086), kek, ext, 4096) == ckr.MECHANISM_INVALID
    assert tok.rv("C_WrapKey", Mechanism(KW), kek + 999, ext, 4096) \
        == ckr.WRAPPING_KEY_HANDLE_INVALID
    (n,) = tok("C_WrapKey", Mechanism(KW), kek, ext, 0)
    assert n.length == 40
    blob = _wrap(tok, KW, kek, ext)
    assert tok.rv("C_UnwrapKey", Mechanism(KW), kek, blob, [A(0x100, CKK_AES)]) \
        == ckr.TEMPLATE_INCOMPLETE
    assert tok.rv("C_UnwrapKey", Mechanism(KW), kek, blob,
                  [A(0, CKO_SECRET), A(0x100, CKK_AES), A(0x165, 1)]) == ckr.ATTRIBUTE_READ_ONLY
    assert tok.rv("C_UnwrapKey", Mechanism(KW), kek, blob[:12],
                  [A(0, CKO_SECRET), A(0x100, CKK_AES)]) == ckr.WRAPPED_KEY_LEN_RANGE

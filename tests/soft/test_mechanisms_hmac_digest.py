"""HMAC (RFC 4231 vectors), digests (multi-part, C_DigestKey), generic secret
generation and random on the soft token."""

from __future__ import annotations

import hashlib
import hmac

from tests.soft.mech_driver import CKK_AES, CKK_GENERIC, A, Tok

from p11gate.codec import ckr
from p11gate.codec.values import Mechanism

# RFC 4231 test cases 1, 2 and 6: (key, data, {mechanism: expected MAC})
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", {
        0x256: "896fb1128abbdf196832107cd49df33f47b4b1169912ba4f53684b22",
        0x251: "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        0x261: "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
               "faea9ea9076ede7f4af152e8b2fa9cb6",
        0x271: "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
               "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"}),
    (b"Jefe", b"what do ya want for nothing?", {
        0x251: "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"}),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First", {
        0x251: "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"}),
]
HMAC_KEY_TYPE = {0x221: 0x28, 0x256: 0x2E, 0x251: 0x2B, 0x261: 0x2C, 0x271: 0x2D}
DIGESTS = {0x220: "sha1", 0x255: "sha224", 0x250: "sha256", 0x260: "sha384", 0x270: "sha512"}


def test_hmac_rfc4231_vectors(tok: Tok) -> None:
    for key, data, macs in RFC4231:
        k = tok.secret(key, CKK_GENERIC)
        for mech, mac in macs.items():
            assert tok.sign(mech, k, data).hex() == mac
            assert tok.sign(mech, k, data, parts=3).hex() == mac
            assert tok.verify_rv(mech, k, data, bytes.fromhex(mac)) == ckr.OK
            assert tok.verify_rv(mech, k, data + b".", bytes.fromhex(mac)) \
                == ckr.SIGNATURE_INVALID


def test_hmac_key_types_and_sha1(tok: Tok) -> None:
    key = bytes(range(40))
    for mech, kt in HMAC_KEY_TYPE.items():
        k = tok.secret(key, kt)
        name = {0x221: "sha1", 0x256: "sha224", 0x251: "sha256", 0x261: "sha384",
                0x271: "sha512"}[mech]
        assert tok.sign(mech, k, b"data") == hmac.new(key, b"data", name).digest()
        # a CKK_SHA256_HMAC key serves only SHA-256 HMAC
        other = 0x251 if mech != 0x251 else 0x271
        assert tok.rv("C_SignInit", Mechanism(other), k) == ckr.KEY_TYPE_INCONSISTENT
    aes = tok.secret(bytes(32), CKK_AES)
    assert tok.rv("C_SignInit", Mechanism(0x251), aes) == ckr.KEY_TYPE_INCONSISTENT
    g = tok.secret(key, CKK_GENERIC)
    assert tok.rv("C_SignInit", Mechanism(0x251, b"\x20" + bytes(7)), g) \
        == ckr.MECHANISM_PARAM_INVALID
    assert tok.verify_rv(0x251, g, b"d", bytes(31)) == ckr.SIGNATURE_LEN_RANGE
    tok("C_SignInit", Mechanism(0x251), g)
    (n,) = tok("C_Sign", b"d", 0)
    assert n.length == 32


def test_digests_multipart_and_digest_key(tok: Tok) -> None:
    data = b"digest me " * 50
    for mech, name in DIGESTS.items():
        tok("C_DigestInit", Mechanism(mech))
        (out,) = tok("C_Digest", data, 64)
        assert out == hashlib.new(name, data).digest()
        tok("C_DigestInit", Mechanism(mech))
        for i in range(0, len(data), 77):
            tok("C_DigestUpdate", data[i:i + 77])
        (out,) = tok("C_DigestFinal", 64)
        assert out == hashlib.new(name, data).digest()
    secret = bytes(range(32))
    ext = tok.secret(secret, CKK_GENERIC, extractable=1)
    tok("C_DigestInit", Mechanism(0x250))
    tok("C_DigestUpdate", b"a")
    tok("C_DigestKey", ext)
    (out,) = tok("C_DigestFinal", 64)
    assert out == hashlib.sha256(b"a" + secret).digest()
    locked = tok.secret(secret, CKK_GENERIC)
    tok("C_DigestInit", Mechanism(0x250))
    assert tok.rv("C_DigestKey", locked) == ckr.KEY_INDIGESTIBLE
    assert tok.rv("C_DigestInit", Mechanism(0x210)) == ckr.MECHANISM_INVALID  # MD5
    assert tok.rv("C_DigestInit", Mechanism(0x251)) == ckr.MECHANISM_INVALID  # an HMAC


def test_generic_secret_generation_and_random(tok: Tok) -> None:
    (k,) = tok("C_GenerateKey", Mechanism(0x350), [A(0x161, 48), A(0x108, 1), A(0x10A, 1)])
    assert tok.attr(k, 0x100) == CKK_GENERIC and tok.attr(k, 0x161) == 48
    assert tok.attr(k, 0x165) == 1 and tok.attr(k, 0x164) == 1  # always sensitive, never ext.
    mac = tok.sign(0x251, k, b"x")
    assert tok.verify_rv(0x251, k, b"x", mac) == ckr.OK
    (k2,) = tok("C_GenerateKey", Mechanism(0x350), [A(0x100, 0x2B), A(0x161, 32)])
    assert tok.attr(k2, 0x100) == 0x2B
    assert tok.rv("C_GenerateKey", Mechanism(0x350), [A(0x161, 0)]) == ckr.KEY_SIZE_RANGE
    assert tok.rv("C_GenerateKey", Mechanism(0x350), []) == ckr.TEMPLATE_INCOMPLETE
    assert tok.rv("C_GenerateKey", Mechanism(0x350), [A(0x100, CKK_AES), A(0x161, 16)]) \
        == ckr.TEMPLATE_INCONSISTENT
    (r1,) = tok("C_GenerateRandom", 64)
    (r2,) = tok("C_GenerateRandom", 64)
    assert len(r1) == 64 and r1 != r2



def test_mechanism_info_lists_exactly_what_is_implemented(tok: Tok) -> None:
    from p11gate.backends.soft import mechanisms as M

    (mechs,) = tok.d("C_GetMechanismList", 1, 128)
    assert set(mechs) == set(M.MECHANISMS) and len(mechs) == len(set(mechs))
    sign_verify, enc_dec, wrap, derive = 0x800 | 0x2000, 0x100 | 0x200, 0x20000 | 0x40000, \
        0x80000
    expect = {0x251: (1, 512, sign_verify), 0x1087: (16, 32, enc_dec),
              0x2109: (16, 32, enc_dec | wrap), 0x250: (0, 0, 0x400),
              0x350: (1, 512, 0x8000), 0x1057: (255, 448, sign_verify),
              0x9: (2048, 4096, enc_dec | wrap)}
    for mech, (lo, hi, flags) in expect.items():
        assert tok.d("C_GetMechanismInfo", 1, mech) == [lo, hi, flags], hex(mech)
    assert tok.d("C_GetMechanismInfo", 1, 0x1050)[2] & derive
    for missing in (0x210, 0x1084, 0x222, 0x1051, 0x2, 0x120):  # MD5, AES MAC, ...
        assert tok.d.rv("C_GetMechanismInfo", 1, missing) == ckr.MECHANISM_INVALID
        assert tok.rv("C_DigestInit", Mechanism(missing)) == ckr.MECHANISM_INVALID

"""ECDSA (P-256/384/521, raw and hashed), EdDSA (Ed25519/Ed448) and ECDH1 derive on the
soft token, against `cryptography` both ways."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from tests.soft.mech_driver import (
    CKK_AES,
    CKK_GENERIC,
    CKO_SECRET,
    ED448_OID,
    ED25519_OID,
    P256,
    P384,
    P521,
    A,
    Tok,
)

from p11gate.codec import ckr
from p11gate.codec.values import Ecdh1Params, Mechanism

MSG = b"an EC signature over this message"
CURVES = {P256: ec.SECP256R1(), P384: ec.SECP384R1(), P521: ec.SECP521R1()}
HASHED = {0x1042: hashes.SHA1, 0x1043: hashes.SHA224, 0x1044: hashes.SHA256,
          0x1045: hashes.SHA384, 0x1046: hashes.SHA512}


def _public(tok: Tok, pub: int, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    point = tok.attr(pub, 0x181)
    assert point[0] == 0x04  # a DER OCTET STRING around the point
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point[-(len(point) - (
        3 if point[1] == 0x81 else 2)):])


def _rs(sig: bytes) -> bytes:
    n = len(sig) // 2
    return encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))


@pytest.mark.parametrize("params", [P256, P384, P521])
def test_ecdsa_every_curve_and_hash(tok: Tok, params: bytes) -> None:
    curve = CURVES[params]
    pub, priv = tok.pair(0x1040, [A(0x180, params)])
    key = _public(tok, pub, curve)
    size = (curve.key_size + 7) // 8
    for mech, h in HASHED.items():
        sig = tok.sign(mech, priv, MSG, parts=3)
        assert len(sig) == 2 * size  # r||s of the curve's size
        key.verify(_rs(sig), MSG, ec.ECDSA(h()))
    digest = hashes.Hash(hashes.SHA384())
    digest.update(MSG)
    d = digest.finalize()
    sig = tok.sign(0x1041, priv, d)
    key.verify(_rs(sig), d, ec.ECDSA(Prehashed(hashes.SHA384())))
    # cryptography's signature verifies here, on an imported public key
    mine = ec.generate_private_key(curve)
    point = mine.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    der_point = (bytes([4, len(point)]) if len(point) < 128 else bytes([4, 0x81, len(point)]))
    (imported,) = tok("C_CreateObject", [A(0, 2), A(0x100, 3), A(0x10A, 1),
                                         A(0x180, params), A(0x181, der_point + point)])
    r, s = decode_dss_signature(mine.sign(MSG, ec.ECDSA(hashes.SHA256())))
    theirs = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert tok.verify_rv(0x1044, imported, MSG, theirs) == ckr.OK
    assert tok.verify_rv(0x1044, imported, MSG + b"!", theirs) == ckr.SIGNATURE_INVALID
    assert tok.verify_rv(0x1044, imported, MSG, theirs[1:]) == ckr.SIGNATURE_LEN_RANGE
    # raw ECDSA is single-part
    tok("C_SignInit", Mechanism(0x1041), priv)
    assert tok.rv("C_SignUpdate", d) == ckr.FUNCTION_NOT_SUPPORTED


def test_ec_params_and_key_types(tok: Tok) -> None:
    secp256k1 = bytes.fromhex("06052b8104000a")
    assert tok.rv("C_GenerateKeyPair", Mechanism(0x1040), [A(0x180, secp256k1)], []) \
        == ckr.CURVE_NOT_SUPPORTED
    assert tok.rv("C_GenerateKeyPair", Mechanism(0x1055), [A(0x180, P256)], []) \
        == ckr.CURVE_NOT_SUPPORTED
    _pub, priv = tok.pair(0x1040, [A(0x180, P256)])
    _epub, epriv = tok.pair(0x1055, [A(0x180, ED25519_OID)])
    assert tok.rv("C_SignInit", Mechanism(0x1057), priv) == ckr.KEY_TYPE_INCONSISTENT
    assert tok.rv("C_SignInit", Mechanism(0x1044), epriv) == ckr.KEY_TYPE_INCONSISTENT
    assert tok.rv("C_SignInit", Mechanism(0x1041, b"\1"), priv) == ckr.MECHANISM_PARAM_INVALID
    info = tok.d("C_GetMechanismInfo", 1, 0x1041)
    assert info[:2] == [256, 521] and info[2] & 0x2800 == 0x2800


@pytest.mark.parametrize("params", [ED25519_OID, ED448_OID, b"\x13\x0cedwards25519",
                                    b"\x13\x0aedwards448"])
def test_eddsa(tok: Tok, params: bytes) -> None:
    pub, priv = tok.pair(0x1055, [A(0x180, params)])
    point = tok.attr(pub, 0x181)
    big = b"448" in params or params == ED448_OID
    raw_len = 57 if big else 32
    assert point[:2] == bytes([0x04, raw_len]) and len(point) == raw_len + 2
    assert tok.attr(pub, 0x180) == params and tok.attr(pub, 0x100) == 0x40
    cls = ed448.Ed448PublicKey if big else ed25519.Ed25519PublicKey
    key = cls.from_public_bytes(point[2:])
    sig = tok.sign(0x1057, priv, MSG)
    assert len(sig) == (114 if big else 64)
    key.verify(sig, MSG)
    assert tok.verify_rv(0x1057, pub, MSG, sig) == ckr.OK
    assert tok.verify_rv(0x1057, pub, MSG[1:], sig) == ckr.SIGNATURE_INVALID
    # cryptography's signature verifies here
    mine = (ed448.Ed448PrivateKey if big else ed25519.Ed25519PrivateKey).generate()
    raw = mine.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    (imported,) = tok("C_CreateObject", [A(0, 2), A(0x100, 0x40), A(0x10A, 1),
                                         A(0x180, params), A(0x181, bytes([4, len(raw)]) + raw)])
    assert tok.verify_rv(0x1057, imported, MSG, mine.sign(MSG)) == ckr.OK
    # CK_EDDSA_PARAMS (prehash or context) are refused; EdDSA is single-part
    assert tok.rv("C_SignInit", Mechanism(0x1057, b"\1" + bytes(15)), priv) \
        == ckr.MECHANISM_PARAM_INVALID
    tok("C_SignInit", Mechanism(0x1057), priv)
    assert tok.rv("C_SignUpdate", MSG) == ckr.FUNCTION_NOT_SUPPORTED


def _derive(tok: Tok, priv: int, p: Ecdh1Params, kt: int, n: int | None) -> int:
    tpl = [A(0, CKO_SECRET), A(0x100, kt), A(0x162, 1), A(0x104, 1), A(0x105, 1)]
    if n is not None:
        tpl.append(A(0x161, n))
    (h,) = tok("C_DeriveKey", Mechanism(0x1050, p), priv, tpl)
    return int(h)


@pytest.mark.parametrize("params", [P256, P384, P521])
def test_ecdh1_derive(tok: Tok, params: bytes) -> None:
    curve = CURVES[params]
    pub, priv = tok.pair(0x1040, [A(0x180, params)])
    ours = _public(tok, pub, curve)
    peer = ec.generate_private_key(curve)
    peer_point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    z = peer.exchange(ec.ECDH(), ours)
    # CKD_NULL into an AES key: the trailing bytes of Z, as SoftHSM keeps them
    h = _derive(tok, priv, Ecdh1Params(1, None, peer_point), CKK_AES, 16)
    assert tok.attr(h, 0x161) == 16 and tok.attr(h, 0x163) == 0  # not CKA_LOCAL
    ct = tok.crypt("Encrypt", 0x1081, h, bytes(16))
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    e = Cipher(algorithms.AES(z[-16:]), modes.ECB()).encryptor()
    assert ct == e.update(bytes(16)) + e.finalize()
    # the SHA-256 KDF with shared data into a generic secret, checked through HMAC
    h = _derive(tok, priv, Ecdh1Params(6, b"info", peer_point), CKK_GENERIC, 32)
    value = X963KDF(hashes.SHA256(), 32, b"info").derive(z)
    from cryptography.hazmat.primitives import hmac

    mac = hmac.HMAC(value, hashes.SHA256())
    mac.update(MSG)
    assert tok.sign(0x251, h, MSG) == mac.finalize()
    # bad parameters
    off_curve = b"\x04" + bytes(len(peer_point) - 1)
    bad = {
        "point not on the curve": Ecdh1Params(1, None, off_curve),
        "unknown kdf": Ecdh1Params(99, None, peer_point),
        "CKD_NULL with shared data": Ecdh1Params(1, b"x", peer_point),
        "no point": Ecdh1Params(1, None, None),
        "raw bytes": b"\0" * 24,
    }
    for why, p in bad.items():
        rv = tok.rv("C_DeriveKey", Mechanism(0x1050, p), priv,
                    [A(0, CKO_SECRET), A(0x100, CKK_GENERIC), A(0x161, 16)])
        assert rv == ckr.MECHANISM_PARAM_INVALID, why
    assert tok.rv("C_DeriveKey", Mechanism(0x1050, Ecdh1Params(1, None, peer_point)), pub,
                  [A(0, CKO_SECRET), A(0x100, CKK_GENERIC), A(0x161, 16)]) in (
        ckr.KEY_FUNCTION_NOT_PERMITTED, ckr.KEY_TYPE_INCONSISTENT)
    # and the key still derives
    _derive(tok, priv, Ecdh1Params(1, None, peer_point), CKK_GENERIC, None)

"""Soft token mechanisms, all through `cryptography` (nothing hand-rolled)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ...codec import ckr
from ...codec.values import GcmParams, IvParams, PssParams
from ...errors import Pkcs11Error

CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS = 0x0, 0x1, 0xD
CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS = 0x40, 0x43
CKM_SHA256 = 0x250
CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_ECDSA_SHA256 = 0x1040, 0x1041, 0x1044
CKM_AES_KEY_GEN, CKM_AES_CBC_PAD, CKM_AES_GCM = 0x1080, 0x1085, 0x1087
CKM_SHA_1, CKM_SHA224, CKM_SHA384, CKM_SHA512 = 0x220, 0x255, 0x260, 0x270
CKG_MGF1_SHA1, CKG_MGF1_SHA256, CKG_MGF1_SHA384, CKG_MGF1_SHA512 = 1, 2, 3, 4
CKG_MGF1_SHA224 = 5

# CKF_ mechanism flags
F_ENCRYPT, F_DECRYPT, F_DIGEST, F_SIGN, F_VERIFY = 0x100, 0x200, 0x400, 0x800, 0x2000
F_GENERATE, F_GENERATE_KEY_PAIR = 0x8000, 0x10000
F_EC = 0x100000 | 0x800000 | 0x1000000  # EC_F_P, EC_NAMEDCURVE, EC_UNCOMPRESS

RSA_MIN, RSA_MAX = 2048, 4096
#: mechanism → (min key size, max key size, flags): only what is implemented
MECHANISMS: dict[int, tuple[int, int, int]] = {
    CKM_RSA_PKCS_KEY_PAIR_GEN: (RSA_MIN, RSA_MAX, F_GENERATE_KEY_PAIR),
    CKM_RSA_PKCS: (RSA_MIN, RSA_MAX, F_SIGN | F_VERIFY),
    CKM_SHA256_RSA_PKCS: (RSA_MIN, RSA_MAX, F_SIGN | F_VERIFY),
    CKM_RSA_PKCS_PSS: (RSA_MIN, RSA_MAX, F_SIGN | F_VERIFY),
    CKM_SHA256_RSA_PKCS_PSS: (RSA_MIN, RSA_MAX, F_SIGN | F_VERIFY),
    CKM_EC_KEY_PAIR_GEN: (256, 384, F_GENERATE_KEY_PAIR | F_EC),
    CKM_ECDSA: (256, 384, F_SIGN | F_VERIFY | F_EC),
    CKM_ECDSA_SHA256: (256, 384, F_SIGN | F_VERIFY | F_EC),
    CKM_AES_KEY_GEN: (16, 32, F_GENERATE),
    CKM_AES_CBC_PAD: (16, 32, F_ENCRYPT | F_DECRYPT),
    CKM_AES_GCM: (16, 32, F_ENCRYPT | F_DECRYPT),
    CKM_SHA256: (0, 0, F_DIGEST),
}
SIGN_MECHS = {m for m, (_a, _b, f) in MECHANISMS.items() if f & F_SIGN}
RSA_MECHS = {CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS}
EC_MECHS = {CKM_ECDSA, CKM_ECDSA_SHA256}
HASHED = {CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS, CKM_ECDSA_SHA256}
CIPHER_MECHS = {CKM_AES_CBC_PAD, CKM_AES_GCM}

#: DER OIDs of the supported curves (CKA_EC_PARAMS)
CURVES: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
}
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    CKM_SHA_1: hashes.SHA1, CKM_SHA224: hashes.SHA224, CKM_SHA256: hashes.SHA256,
    CKM_SHA384: hashes.SHA384, CKM_SHA512: hashes.SHA512,
}
_MGFS: dict[int, type[hashes.HashAlgorithm]] = {
    CKG_MGF1_SHA1: hashes.SHA1, CKG_MGF1_SHA224: hashes.SHA224, CKG_MGF1_SHA256: hashes.SHA256,
    CKG_MGF1_SHA384: hashes.SHA384, CKG_MGF1_SHA512: hashes.SHA512,
}
_BY_LEN: dict[int, type[hashes.HashAlgorithm]] = {
    20: hashes.SHA1, 28: hashes.SHA224, 32: hashes.SHA256, 48: hashes.SHA384, 64: hashes.SHA512,
}
#: raw (one-part) mechanisms buffer their input up to this size
MAX_DATA = 1 << 20

PrivKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PubKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _fail(rv: int, detail: str = "") -> Pkcs11Error:
    return Pkcs11Error(rv, detail)


# ------------------------------------------------------------------ key generation


def generate_rsa(bits: int, exponent: int) -> rsa.RSAPrivateKey:
    if not RSA_MIN <= bits <= RSA_MAX or bits % 8:
        raise _fail(ckr.KEY_SIZE_RANGE, f"RSA {bits} bits")
    if exponent not in (3, 65537):
        raise _fail(ckr.TEMPLATE_INCONSISTENT, "public exponent")
    return rsa.generate_private_key(exponent, bits)


def generate_ec(params: bytes) -> ec.EllipticCurvePrivateKey:
    curve = CURVES.get(params)
    if curve is None:
        raise _fail(ckr.CURVE_NOT_SUPPORTED, "only P-256 and P-384")
    return ec.generate_private_key(curve)


def private_der(key: PrivKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(der: bytes) -> PrivKey:
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def ec_point(pub: ec.EllipticCurvePublicKey) -> bytes:
    """CKA_EC_POINT: the uncompressed point in a DER OCTET STRING."""
    raw = pub.public_bytes(serialization.Encoding.X962,
                           serialization.PublicFormat.UncompressedPoint)
    return bytes([0x04, len(raw)]) + raw


def int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")


def public_from_attrs(key_type: int, attrs: dict[int, Any]) -> PubKey:
    """The public key of a public key object (CKA_MODULUS/EXPONENT or EC_PARAMS/POINT)."""
    try:
        if key_type == 0:
            n = int.from_bytes(attrs[0x120], "big")
            e = int.from_bytes(attrs[0x122], "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        curve = CURVES.get(attrs[0x180])
        if curve is None:
            raise _fail(ckr.CURVE_NOT_SUPPORTED)
        point = attrs[0x181]
        size = (curve.key_size + 7) // 8 * 2 + 1
        if len(point) == size + 2 and point[0] == 0x04 and point[1] == size:
            point = point[2:]
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except (KeyError, ValueError, TypeError):
        raise _fail(ckr.TEMPLATE_INCOMPLETE, "public key attributes") from None


# ------------------------------------------------------------------ operations


@dataclass
class Operation:
    mech: int
    param: Any
    key: Any  # PrivKey | PubKey | bytes (AES)
    hasher: Any = None
    data: bytearray = field(default_factory=bytearray)
    #: (input, output) of a size query, so the next call returns the same bytes
    cached: tuple[bytes, bytes] | None = None

    def update(self, chunk: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(chunk)
            return
        if len(self.data) + len(chunk) > MAX_DATA:
            raise _fail(ckr.DATA_LEN_RANGE)
        self.data += chunk


def _pss(p: Any, digest_len: int | None) -> tuple[apad.PSS, type[hashes.HashAlgorithm]]:
    if not isinstance(p, PssParams):
        raise _fail(ckr.MECHANISM_PARAM_INVALID, "CK_RSA_PKCS_PSS_PARAMS needed")
    h, mgf = _HASHES.get(p.hash_alg), _MGFS.get(p.mgf)
    if h is None or mgf is None or not 0 <= p.salt_len <= 512:
        raise _fail(ckr.MECHANISM_PARAM_INVALID, "PSS hash, MGF or salt length")
    if digest_len is not None and digest_len != h.digest_size:
        raise _fail(ckr.DATA_LEN_RANGE)
    return apad.PSS(apad.MGF1(mgf()), p.salt_len), h


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    """Check the mechanism against the key kind and start one operation."""
    if mech in RSA_MECHS:
        if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            raise _fail(ckr.KEY_TYPE_INCONSISTENT)
        if mech in (CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS):
            _pss(param, None)
        elif param not in (None, b""):
            raise _fail(ckr.MECHANISM_PARAM_INVALID)
    elif mech in EC_MECHS:
        if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            raise _fail(ckr.KEY_TYPE_INCONSISTENT)
        if param not in (None, b""):
            raise _fail(ckr.MECHANISM_PARAM_INVALID)
    elif mech in CIPHER_MECHS:
        if not isinstance(key, bytes):
            raise _fail(ckr.KEY_TYPE_INCONSISTENT)
        if mech == CKM_AES_CBC_PAD:
            iv = param.iv if isinstance(param, IvParams) else param
            if not isinstance(iv, bytes) or len(iv) != 16:
                raise _fail(ckr.MECHANISM_PARAM_INVALID, "a 16-byte IV")
            param = iv
        else:
            if (not isinstance(param, GcmParams) or not param.iv or len(param.iv) > 128
                    or param.tag_bits not in (96, 104, 112, 120, 128)):
                raise _fail(ckr.MECHANISM_PARAM_INVALID, "CK_GCM_PARAMS")
    elif mech == CKM_SHA256:
        if param not in (None, b""):
            raise _fail(ckr.MECHANISM_PARAM_INVALID)
        return Operation(mech, None, None, hashlib.sha256())
    else:
        raise _fail(ckr.MECHANISM_INVALID)
    hasher = hashlib.sha256() if mech in HASHED else None
    return Operation(mech, param, key, hasher)


def _ecdsa_algo(op: Operation) -> tuple[bytes, ec.ECDSA]:
    if op.hasher is not None:
        return op.hasher.digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    h = _BY_LEN.get(len(op.data))
    if h is None:
        raise _fail(ckr.DATA_LEN_RANGE, "CKM_ECDSA takes a 20, 28, 32, 48 or 64 byte hash")
    return bytes(op.data), ec.ECDSA(utils.Prehashed(h()))


def sign(op: Operation) -> bytes:
    key = op.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest, algo = _ecdsa_algo(op)
        r, s = utils.decode_dss_signature(key.sign(digest, algo))
        n = (key.curve.key_size + 7) // 8
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _fail(ckr.KEY_FUNCTION_NOT_PERMITTED)
    try:
        if op.mech == CKM_RSA_PKCS:
            if len(op.data) > key.key_size // 8 - 11:
                raise _fail(ckr.DATA_LEN_RANGE)
            return key.sign(bytes(op.data), apad.PKCS1v15(), utils.NoDigestInfo())
        if op.mech == CKM_SHA256_RSA_PKCS:
            return key.sign(op.hasher.digest(), apad.PKCS1v15(),
                            utils.Prehashed(hashes.SHA256()))
        if op.mech == CKM_RSA_PKCS_PSS:
            pss, h = _pss(op.param, len(op.data))
            return key.sign(bytes(op.data), pss, utils.Prehashed(h()))
        pss, h = _pss(op.param, None)
        return key.sign(op.hasher.digest(), pss, utils.Prehashed(hashes.SHA256()))
    except ValueError:
        raise _fail(ckr.DATA_LEN_RANGE) from None


def signature_length(key: Any) -> int:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return (key.curve.key_size + 7) // 8 * 2
    return int(key.key_size + 7) // 8


def verify(op: Operation, signature: bytes) -> None:
    key = op.key
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if len(signature) != signature_length(key):
        raise _fail(ckr.SIGNATURE_LEN_RANGE)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest, algo = _ecdsa_algo(op)
            n = len(signature) // 2
            der = utils.encode_dss_signature(int.from_bytes(signature[:n], "big"),
                                             int.from_bytes(signature[n:], "big"))
            key.verify(der, digest, algo)
            return
        assert isinstance(key, rsa.RSAPublicKey)
        if op.mech == CKM_RSA_PKCS:
            key.verify(signature, bytes(op.data), apad.PKCS1v15(),
                       utils.NoDigestInfo())  # type: ignore[arg-type]
        elif op.mech == CKM_SHA256_RSA_PKCS:
            key.verify(signature, op.hasher.digest(), apad.PKCS1v15(),
                       utils.Prehashed(hashes.SHA256()))
        elif op.mech == CKM_RSA_PKCS_PSS:
            pss, h = _pss(op.param, len(op.data))
            key.verify(signature, bytes(op.data), pss, utils.Prehashed(h()))
        else:
            pss, h = _pss(op.param, None)
            key.verify(signature, op.hasher.digest(), pss, utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise _fail(ckr.SIGNATURE_INVALID) from None
    except ValueError:
        raise _fail(ckr.SIGNATURE_INVALID) from None


def encrypt(op: Operation, data: bytes) -> bytes:
    if op.mech == CKM_AES_CBC_PAD:
        p = padding.PKCS7(128).padder()
        padded = p.update(data) + p.finalize()
        e = Cipher(algorithms.AES(op.key), modes.CBC(op.param)).encryptor()
        return e.update(padded) + e.finalize()
    g: GcmParams = op.param
    e = Cipher(algorithms.AES(op.key), modes.GCM(g.iv or b"")).encryptor()
    if g.aad:
        e.authenticate_additional_data(g.aad)
    return e.update(data) + e.finalize() + e.tag[: g.tag_bits // 8]


def decrypt(op: Operation, data: bytes) -> bytes:
    if op.mech == CKM_AES_CBC_PAD:
        if not data or len(data) % 16:
            raise _fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
        d = Cipher(algorithms.AES(op.key), modes.CBC(op.param)).decryptor()
        padded = d.update(data) + d.finalize()
        try:
            u = padding.PKCS7(128).unpadder()
            return u.update(padded) + u.finalize()
        except ValueError:
            raise _fail(ckr.ENCRYPTED_DATA_INVALID) from None
    g: GcmParams = op.param
    t = g.tag_bits // 8
    if len(data) < t:
        raise _fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
    try:
        dec = Cipher(algorithms.AES(op.key), modes.GCM(g.iv or b"", data[-t:], min_tag_length=t)
                     ).decryptor()
        if g.aad:
            dec.authenticate_additional_data(g.aad)
        return dec.update(data[:-t]) + dec.finalize()
    except (InvalidTag, ValueError):
        raise _fail(ckr.ENCRYPTED_DATA_INVALID) from None


def random_bytes(n: int) -> bytes:
    return os.urandom(n)

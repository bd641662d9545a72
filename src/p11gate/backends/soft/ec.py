"""Elliptic curves: ECDSA on P-256/P-384/P-521, EdDSA on Ed25519/Ed448, ECDH1 derive."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, utils
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from ...codec import ckr
from ...codec.values import Ecdh1Params
from ...errors import Pkcs11Error
from .mechbase import (
    CKM_SHA224,
    CKM_SHA256,
    CKM_SHA384,
    CKM_SHA512,
    CKM_SHA_1,
    F_DERIVE,
    F_EC,
    F_GENERATE_KEY_PAIR,
    F_SIGN,
    F_VERIFY,
    HASHES,
    Buffered,
    Operation,
    fail,
    no_param,
)

CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_ECDSA_SHA1 = 0x1040, 0x1041, 0x1042
CKM_ECDSA_SHA224, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384, CKM_ECDSA_SHA512 = (
    0x1043, 0x1044, 0x1045, 0x1046)
CKM_ECDH1_DERIVE, CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA = 0x1050, 0x1055, 0x1057
#: CKD_* key derivation functions of CK_ECDH1_DERIVE_PARAMS → hash (None: CKD_NULL)
KDFS: dict[int, int | None] = {1: None, 2: CKM_SHA_1, 5: CKM_SHA224, 6: CKM_SHA256,
                               7: CKM_SHA384, 8: CKM_SHA512}
ECDSA_HASHED = {CKM_ECDSA_SHA1: CKM_SHA_1, CKM_ECDSA_SHA224: CKM_SHA224,
                CKM_ECDSA_SHA256: CKM_SHA256, CKM_ECDSA_SHA384: CKM_SHA384,
                CKM_ECDSA_SHA512: CKM_SHA512}
_SV = F_SIGN | F_VERIFY
MECHANISMS: dict[int, tuple[int, int, int]] = {
    CKM_EC_KEY_PAIR_GEN: (256, 521, F_GENERATE_KEY_PAIR | F_EC),
    CKM_ECDSA: (256, 521, _SV | F_EC),
    **{m: (256, 521, _SV | F_EC) for m in ECDSA_HASHED},
    CKM_ECDH1_DERIVE: (256, 521, F_DERIVE | F_EC),
    CKM_EC_EDWARDS_KEY_PAIR_GEN: (255, 448, F_GENERATE_KEY_PAIR),
    CKM_EDDSA: (255, 448, _SV),
}

#: DER OIDs of the NIST curves (CKA_EC_PARAMS; SoftHSM takes only the OID for these)
CURVES: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}
ED25519, ED448 = "ed25519", "ed448"
#: CKA_EC_PARAMS of the Edwards curves: the RFC 8410 OID, or the printable string
#: SoftHSM 2.6 and pkcs11-tool write
EDWARDS: dict[bytes, str] = {
    bytes.fromhex("06032b6570"): ED25519,
    bytes.fromhex("06032b6571"): ED448,
    b"\x13\x0c" + b"edwards25519": ED25519,
    b"\x13\x0a" + b"edwards448": ED448,
}
EdPriv = ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
EdPub = ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
_BY_LENGTH: dict[int, type[hashes.HashAlgorithm]] = {
    h.digest_size: h for h in HASHES.values()}  # type: ignore[misc]
RAW_HASH_SIZES = frozenset(_BY_LENGTH)
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate(params: bytes) -> ec.EllipticCurvePrivateKey:
    curve = CURVES.get(params)
    if curve is None:
        raise fail(ckr.CURVE_NOT_SUPPORTED, "P-256, P-384 and P-521 only")
    return ec.generate_private_key(curve)


def generate_edwards(params: bytes) -> EdPriv:
    name = EDWARDS.get(params)
    if name is None:
        raise fail(ckr.CURVE_NOT_SUPPORTED, "Ed25519 and Ed448 only")
    if name == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return ed448.Ed448PrivateKey.generate()


def octet_string(raw: bytes) -> bytes:
    """A DER OCTET STRING (CKA_EC_POINT as SoftHSM 2.6 writes it)."""
    if len(raw) < 0x80:
        return bytes([0x04, len(raw)]) + raw
    return bytes([0x04, 0x81, len(raw)]) + raw


def unwrap_octet_string(data: bytes, raw_len: int) -> bytes:
    """The point inside a DER OCTET STRING, or the data itself when it is the bare point."""
    if len(data) == raw_len:
        return data
    for head in (bytes([0x04, raw_len]), bytes([0x04, 0x81, raw_len])):
        if raw_len < 0x80 and head[1] == 0x81:
            continue
        if data.startswith(head) and len(data) == len(head) + raw_len:
            return data[len(head):]
    raise fail(ckr.ATTRIBUTE_VALUE_INVALID, "EC point encoding")


def ec_point(pub: ec.EllipticCurvePublicKey | EdPub) -> bytes:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return octet_string(pub.public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint))
    return octet_string(pub.public_bytes(*_RAW))


def _point_len(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8 * 2 + 1


def public_key(params: bytes, point: bytes) -> ec.EllipticCurvePublicKey | EdPub:
    """The public key of CKA_EC_PARAMS and CKA_EC_POINT (either curve family)."""
    curve = CURVES.get(params)
    if curve is not None:
        raw = unwrap_octet_string(point, _point_len(curve))
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
        except ValueError:
            raise fail(ckr.ATTRIBUTE_VALUE_INVALID, "point not on the curve") from None
    name = EDWARDS.get(params)
    if name is None:
        raise fail(ckr.CURVE_NOT_SUPPORTED)
    if name == ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(unwrap_octet_string(point, 32))
    return ed448.Ed448PublicKey.from_public_bytes(unwrap_octet_string(point, 57))


def _size(key: Any) -> int:
    return (key.curve.key_size + 7) // 8


class Ecdsa(Buffered):
    def __init__(self, mech: int, param: Any, key: Any) -> None:
        super().__init__()
        no_param(param)
        self.mech, self.key = mech, key
        self.single_part = mech == CKM_ECDSA
        h = ECDSA_HASHED.get(mech)
        self.hasher = hashes.Hash(HASHES[h]()) if h is not None else None

    def update(self, chunk: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(chunk)
        else:
            super().update(chunk)

    def out_len(self) -> int:
        return _size(self.key) * 2

    def _digest(self) -> tuple[bytes, ec.ECDSA]:
        if self.hasher is not None:
            h = self.hasher.copy()
            return h.finalize(), ec.ECDSA(utils.Prehashed(h.algorithm))
        data = bytes(self.data)
        # raw ECDSA takes the output of a hash this token knows, nothing else: an odd
        # length is far more likely a caller's bug than a hash
        if len(data) not in RAW_HASH_SIZES:
            raise fail(ckr.DATA_LEN_RANGE, "CKM_ECDSA takes a 20, 28, 32, 48 or 64 byte hash")
        return data, ec.ECDSA(utils.Prehashed(_BY_LENGTH[len(data)]()))

    def sign(self) -> bytes:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            raise fail(ckr.KEY_TYPE_INCONSISTENT)
        digest, algo = self._digest()
        r, s = utils.decode_dss_signature(self.key.sign(digest, algo))
        n = _size(self.key)
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")

    def verify(self, signature: bytes) -> None:
        key = self.key.public_key() if isinstance(self.key, ec.EllipticCurvePrivateKey) \
            else self.key
        if len(signature) != self.out_len():
            raise fail(ckr.SIGNATURE_LEN_RANGE)
        digest, algo = self._digest()
        n = len(signature) // 2
        der = utils.encode_dss_signature(int.from_bytes(signature[:n], "big"),
                                         int.from_bytes(signature[n:], "big"))
        try:
            key.verify(der, digest, algo)
        except InvalidSignature:
            raise fail(ckr.SIGNATURE_INVALID) from None


class EdDsa(Buffered):
    """Pure EdDSA: PKCS#11 makes it single-part. CK_EDDSA_PARAMS (prehash, context) are
    not supported and any parameter is refused."""

    single_part = True

    def __init__(self, mech: int, param: Any, key: Any) -> None:
        super().__init__()
        if param not in (None, b""):
            raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_EDDSA_PARAMS not supported")
        self.mech, self.key = mech, key

    def out_len(self) -> int:
        return 64 if isinstance(self.key, ed25519.Ed25519PrivateKey
                                | ed25519.Ed25519PublicKey) else 114

    def sign(self) -> bytes:
        if not isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            raise fail(ckr.KEY_TYPE_INCONSISTENT)
        return self.key.sign(bytes(self.data))

    def verify(self, signature: bytes) -> None:
        key = self.key
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            key = key.public_key()
        if len(signature) != self.out_len():
            raise fail(ckr.SIGNATURE_LEN_RANGE)
        try:
            key.verify(signature, bytes(self.data))
        except InvalidSignature:
            raise fail(ckr.SIGNATURE_INVALID) from None


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    if mech == CKM_EDDSA:
        if not isinstance(key, EdPriv | EdPub):
            raise fail(ckr.KEY_TYPE_INCONSISTENT)
        return EdDsa(mech, param, key)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise fail(ckr.KEY_TYPE_INCONSISTENT)
    return Ecdsa(mech, param, key)


def ecdh_derive(key: Any, param: Any, length: int) -> bytes:
    """CKM_ECDH1_DERIVE: Z from our private key and the peer's point, then the KDF."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise fail(ckr.KEY_TYPE_INCONSISTENT)
    if not isinstance(param, Ecdh1Params) or param.kdf not in KDFS or not param.public_data:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_ECDH1_DERIVE_PARAMS")
    kdf, shared = KDFS[param.kdf], param.shared_data or b""
    if kdf is None and shared:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CKD_NULL takes no shared data")
    try:
        raw = unwrap_octet_string(param.public_data, _point_len(key.curve))
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, raw)
    except (ValueError, Pkcs11Error):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "peer point not on the curve") from None
    z = key.exchange(ec.ECDH(), peer)
    if kdf is None:
        if length > len(z):
            raise fail(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN longer than the secret")
        return z[len(z) - length:]  # SoftHSM keeps the trailing bytes
    return X963KDF(HASHES[kdf](), length, shared).derive(z)

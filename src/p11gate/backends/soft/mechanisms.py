"""The soft token's mechanisms: one table of what is implemented (families in rsa.py,
ec.py, aes.py, hmac_digest.py), key generation and key encodings. All through
`cryptography`; nothing hand-rolled."""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ...codec import ckr
from . import aes, hmac_digest
from . import ec as ecm
from . import rsa as rsam
from .aes import (  # noqa: F401  (the names callers and tests use)
    CKM_AES_CBC,
    CKM_AES_CBC_PAD,
    CKM_AES_CTR,
    CKM_AES_ECB,
    CKM_AES_GCM,
    CKM_AES_KEY_GEN,
    CKM_AES_KEY_WRAP,
    CKM_AES_KEY_WRAP_PAD,
)
from .ec import (  # noqa: F401
    CKM_EC_EDWARDS_KEY_PAIR_GEN,
    CKM_EC_KEY_PAIR_GEN,
    CKM_ECDH1_DERIVE,
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_EDDSA,
    CURVES,
    EDWARDS,
)
from .hmac_digest import CKM_GENERIC_SECRET_KEY_GEN, CKM_SHA256_HMAC  # noqa: F401
from .mechbase import (  # noqa: F401
    CKM_SHA256,
    F_DECRYPT,
    F_DERIVE,
    F_DIGEST,
    F_ENCRYPT,
    F_GENERATE,
    F_GENERATE_KEY_PAIR,
    F_SIGN,
    F_UNWRAP,
    F_VERIFY,
    F_WRAP,
    Operation,
    fail,
)
from .rsa import (  # noqa: F401
    CKM_RSA_PKCS,
    CKM_RSA_PKCS_KEY_PAIR_GEN,
    CKM_RSA_PKCS_OAEP,
    CKM_RSA_PKCS_PSS,
    CKM_SHA256_RSA_PKCS,
    CKM_SHA256_RSA_PKCS_PSS,
    RSA_MAX,
    RSA_MIN,
)

CKG_MGF1_SHA256 = 2
CKK_RSA, CKK_EC, CKK_GENERIC_SECRET, CKK_AES, CKK_EC_EDWARDS = 0x0, 0x3, 0x10, 0x1F, 0x40

#: mechanism → (min key size, max key size, flags): exactly what is implemented
MECHANISMS: dict[int, tuple[int, int, int]] = {
    **rsam.MECHANISMS, **ecm.MECHANISMS, **aes.MECHANISMS, **hmac_digest.MECHANISMS,
}
_FAMILY: dict[int, Any] = {
    **{m: rsam for m in rsam.MECHANISMS}, **{m: ecm for m in ecm.MECHANISMS},
    **{m: aes for m in aes.MECHANISMS}, **{m: hmac_digest for m in hmac_digest.MECHANISMS},
}


def key_types(mech: int) -> frozenset[int]:
    """The CKA_KEY_TYPE values a mechanism's key may have."""
    if mech in rsam.MECHANISMS:
        return frozenset({CKK_RSA})
    if mech == CKM_EDDSA:
        return frozenset({CKK_EC_EDWARDS})
    if mech in ecm.MECHANISMS:
        return frozenset({CKK_EC})
    if mech in aes.MECHANISMS:
        return frozenset({CKK_AES})
    hm = hmac_digest.HMACS.get(mech)
    return frozenset({CKK_GENERIC_SECRET, hm[1]}) if hm else frozenset()


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    """Check the mechanism against the key and start one operation."""
    family = _FAMILY.get(mech)
    if family is None or (kind == "digest") != (mech in hmac_digest.HASHES):
        raise fail(ckr.MECHANISM_INVALID)
    op: Operation = family.start(mech, param, key, kind)
    return op


# ------------------------------------------------------------------ keys

PrivKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey \
    | ed448.Ed448PrivateKey
PubKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey \
    | ed448.Ed448PublicKey

generate_rsa = rsam.generate
generate_ec = ecm.generate
generate_edwards = ecm.generate_edwards
ec_point = ecm.ec_point


def private_der(key: PrivKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(der: bytes) -> PrivKey:
    key = serialization.load_der_private_key(der, None)
    if not isinstance(key, PrivKey):
        raise fail(ckr.KEY_TYPE_INCONSISTENT, "unsupported private key")
    return key


def int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")


def public_from_attrs(key_type: int, attrs: dict[int, Any]) -> PubKey:
    """The public key of a public key object (CKA_MODULUS/EXPONENT or EC_PARAMS/POINT)."""
    try:
        if key_type == CKK_RSA:
            n = int.from_bytes(attrs[0x120], "big")
            e = int.from_bytes(attrs[0x122], "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if key_type == CKK_EC and attrs[0x180] not in CURVES:
            raise fail(ckr.CURVE_NOT_SUPPORTED)
        if key_type == CKK_EC_EDWARDS and attrs[0x180] not in EDWARDS:
            raise fail(ckr.CURVE_NOT_SUPPORTED)
        return ecm.public_key(attrs[0x180], attrs[0x181])
    except (KeyError, ValueError, TypeError):
        raise fail(ckr.TEMPLATE_INCOMPLETE, "public key attributes") from None


def random_bytes(n: int) -> bytes:
    return os.urandom(n)

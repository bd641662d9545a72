"""RSA mechanisms: PKCS#1 v1.5, PSS and OAEP (with the SHA-1/SHA-2 variants)."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric import rsa, utils

from ...codec import ckr
from ...codec.values import OaepParams, PssParams
from .mechbase import (
    CKM_SHA224,
    CKM_SHA256,
    CKM_SHA384,
    CKM_SHA512,
    CKM_SHA_1,
    F_DECRYPT,
    F_ENCRYPT,
    F_GENERATE_KEY_PAIR,
    F_SIGN,
    F_UNWRAP,
    F_VERIFY,
    F_WRAP,
    HASHES,
    MGFS,
    Buffered,
    Operation,
    fail,
    no_param,
)

CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS, CKM_RSA_PKCS_OAEP, CKM_RSA_PKCS_PSS = 0x0, 0x1, 0x9, 0xD
CKM_SHA1_RSA_PKCS, CKM_SHA1_RSA_PKCS_PSS = 0x6, 0xE
CKM_SHA256_RSA_PKCS, CKM_SHA384_RSA_PKCS, CKM_SHA512_RSA_PKCS = 0x40, 0x41, 0x42
CKM_SHA256_RSA_PKCS_PSS, CKM_SHA384_RSA_PKCS_PSS, CKM_SHA512_RSA_PKCS_PSS = 0x43, 0x44, 0x45
CKM_SHA224_RSA_PKCS, CKM_SHA224_RSA_PKCS_PSS = 0x46, 0x47
CKZ_DATA_SPECIFIED = 1

RSA_MIN, RSA_MAX = 2048, 4096
#: hashed PKCS#1 v1.5 signatures → their digest
PKCS_HASHED = {CKM_SHA1_RSA_PKCS: CKM_SHA_1, CKM_SHA224_RSA_PKCS: CKM_SHA224,
               CKM_SHA256_RSA_PKCS: CKM_SHA256, CKM_SHA384_RSA_PKCS: CKM_SHA384,
               CKM_SHA512_RSA_PKCS: CKM_SHA512}
PSS_HASHED = {CKM_SHA1_RSA_PKCS_PSS: CKM_SHA_1, CKM_SHA224_RSA_PKCS_PSS: CKM_SHA224,
              CKM_SHA256_RSA_PKCS_PSS: CKM_SHA256, CKM_SHA384_RSA_PKCS_PSS: CKM_SHA384,
              CKM_SHA512_RSA_PKCS_PSS: CKM_SHA512}
_SV = F_SIGN | F_VERIFY
MECHANISMS: dict[int, tuple[int, int, int]] = {
    CKM_RSA_PKCS_KEY_PAIR_GEN: (RSA_MIN, RSA_MAX, F_GENERATE_KEY_PAIR),
    CKM_RSA_PKCS: (RSA_MIN, RSA_MAX, _SV | F_ENCRYPT | F_DECRYPT | F_WRAP | F_UNWRAP),
    CKM_RSA_PKCS_OAEP: (RSA_MIN, RSA_MAX, F_ENCRYPT | F_DECRYPT | F_WRAP | F_UNWRAP),
    CKM_RSA_PKCS_PSS: (RSA_MIN, RSA_MAX, _SV),
    **{m: (RSA_MIN, RSA_MAX, _SV) for m in (*PKCS_HASHED, *PSS_HASHED)},
}
Key = rsa.RSAPrivateKey | rsa.RSAPublicKey


def generate(bits: int, exponent: int) -> rsa.RSAPrivateKey:
    if not RSA_MIN <= bits <= RSA_MAX or bits % 8:
        raise fail(ckr.KEY_SIZE_RANGE, f"RSA {bits} bits")
    if exponent not in (3, 65537):
        raise fail(ckr.TEMPLATE_INCONSISTENT, "public exponent")
    return rsa.generate_private_key(exponent, bits)


def _hash(ckm: int) -> hashes.HashAlgorithm:
    return HASHES[ckm]()


def pss_padding(p: Any, mech_hash: int | None) -> tuple[apad.PSS, hashes.HashAlgorithm]:
    """CK_RSA_PKCS_PSS_PARAMS checked: a known hash, an MGF1 over a known hash, a salt
    no longer than the hash, and for the hashed mechanisms the mechanism's own hash."""
    if not isinstance(p, PssParams):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_RSA_PKCS_PSS_PARAMS needed")
    h, mgf = HASHES.get(p.hash_alg), MGFS.get(p.mgf)
    if h is None or mgf is None or (mech_hash is not None and p.hash_alg != mech_hash):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "PSS hash or MGF")
    if not 0 <= p.salt_len <= 512:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "PSS salt length")
    return apad.PSS(apad.MGF1(mgf()), p.salt_len), h()


def oaep_padding(p: Any) -> apad.OAEP:
    if not isinstance(p, OaepParams):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_RSA_PKCS_OAEP_PARAMS needed")
    h, mgf = HASHES.get(p.hash_alg), MGFS.get(p.mgf)
    if h is None or mgf is None:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "OAEP hash or MGF")
    label = p.source_data or None
    if p.source not in (0, CKZ_DATA_SPECIFIED) or (label and p.source != CKZ_DATA_SPECIFIED):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "OAEP source")
    return apad.OAEP(apad.MGF1(mgf()), h(), label)


class RsaSign(Buffered):
    def __init__(self, mech: int, param: Any, key: Key) -> None:
        super().__init__()
        self.mech, self.key = mech, key
        self.single_part = mech in (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS)
        self.hasher: hashes.Hash | None = None
        if mech == CKM_RSA_PKCS:
            no_param(param)
            self.pad: apad.AsymmetricPadding = apad.PKCS1v15()
        elif mech in PKCS_HASHED:
            no_param(param)
            self.pad = apad.PKCS1v15()
            self.hasher = hashes.Hash(_hash(PKCS_HASHED[mech]))
        elif mech == CKM_RSA_PKCS_PSS:
            self.pad, self.pss_hash = pss_padding(param, None)
        else:
            self.pad, h = pss_padding(param, PSS_HASHED[mech])
            self.hasher = hashes.Hash(h)
        if isinstance(param, PssParams):
            # RFC 8017 §9.1.1: the salt and the hash must fit in the encoded message
            digest = HASHES[param.hash_alg]().digest_size
            if param.salt_len > (key.key_size - 1 + 7) // 8 - digest - 2:
                raise fail(ckr.MECHANISM_PARAM_INVALID, "PSS salt too long for the key")

    def update(self, chunk: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(chunk)
        else:
            super().update(chunk)

    def out_len(self) -> int:
        return (self.key.key_size + 7) // 8

    def _message(self) -> tuple[bytes, Any]:
        if self.hasher is not None:
            h = self.hasher.copy()
            return h.finalize(), utils.Prehashed(h.algorithm)
        if self.mech == CKM_RSA_PKCS:
            if len(self.data) > self.out_len() - 11:
                raise fail(ckr.DATA_LEN_RANGE)
            return bytes(self.data), utils.NoDigestInfo()
        if len(self.data) != self.pss_hash.digest_size:
            raise fail(ckr.DATA_LEN_RANGE, "CKM_RSA_PKCS_PSS signs a hash of the PSS hash")
        return bytes(self.data), utils.Prehashed(self.pss_hash)

    def sign(self) -> bytes:
        if not isinstance(self.key, rsa.RSAPrivateKey):
            raise fail(ckr.KEY_TYPE_INCONSISTENT)
        msg, algo = self._message()
        try:
            return self.key.sign(msg, self.pad, algo)
        except ValueError:
            raise fail(ckr.DATA_LEN_RANGE) from None

    def verify(self, signature: bytes) -> None:
        key = self.key.public_key() if isinstance(self.key, rsa.RSAPrivateKey) else self.key
        if len(signature) != self.out_len():
            raise fail(ckr.SIGNATURE_LEN_RANGE)
        msg, algo = self._message()
        try:
            key.verify(signature, msg, self.pad, algo)
        except (InvalidSignature, ValueError):
            raise fail(ckr.SIGNATURE_INVALID) from None


class RsaCrypt(Buffered):
    """PKCS#1 v1.5 and OAEP encryption: single-part, as PKCS#11 says."""

    single_part = True
    slow = True

    def __init__(self, mech: int, param: Any, key: Key, encrypt: bool) -> None:
        super().__init__()
        self.mech, self.key, self.encrypting = mech, key, encrypt
        if mech == CKM_RSA_PKCS:
            no_param(param)
            self.pad: apad.AsymmetricPadding = apad.PKCS1v15()
        else:
            self.pad = oaep_padding(param)

    def crypt_once(self, data: bytes) -> bytes:
        size = (self.key.key_size + 7) // 8
        try:
            if self.encrypting:
                pub = self.key.public_key() if isinstance(self.key, rsa.RSAPrivateKey) \
                    else self.key
                return pub.encrypt(data, self.pad)
            if not isinstance(self.key, rsa.RSAPrivateKey):
                raise fail(ckr.KEY_TYPE_INCONSISTENT)
            if len(data) != size:
                raise fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
            return self.key.decrypt(data, self.pad)
        except ValueError:
            raise fail(ckr.DATA_LEN_RANGE if self.encrypting
                       else ckr.ENCRYPTED_DATA_INVALID) from None


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        raise fail(ckr.KEY_TYPE_INCONSISTENT)
    if kind in ("sign", "verify"):
        return RsaSign(mech, param, key)
    return RsaCrypt(mech, param, key, kind == "encrypt")

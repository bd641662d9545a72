"""HMAC with SHA-1/SHA-2, the digests, and generic secret generation."""

from __future__ import annotations

import hmac as std_hmac
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac

from ...codec import ckr
from .mechbase import (
    CKM_SHA224,
    CKM_SHA256,
    CKM_SHA384,
    CKM_SHA512,
    CKM_SHA_1,
    F_DIGEST,
    F_GENERATE,
    F_SIGN,
    F_VERIFY,
    HASHES,
    Operation,
    fail,
    no_param,
)

CKM_SHA_1_HMAC, CKM_SHA224_HMAC, CKM_SHA256_HMAC = 0x221, 0x256, 0x251
CKM_SHA384_HMAC, CKM_SHA512_HMAC = 0x261, 0x271
CKM_GENERIC_SECRET_KEY_GEN = 0x350
CKK_GENERIC_SECRET = 0x10
#: HMAC mechanism → (its hash, the CKK_*_HMAC key type it also takes)
HMACS: dict[int, tuple[int, int]] = {
    CKM_SHA_1_HMAC: (CKM_SHA_1, 0x28), CKM_SHA224_HMAC: (CKM_SHA224, 0x2E),
    CKM_SHA256_HMAC: (CKM_SHA256, 0x2B), CKM_SHA384_HMAC: (CKM_SHA384, 0x2C),
    CKM_SHA512_HMAC: (CKM_SHA512, 0x2D),
}
HMAC_KEY_TYPES = frozenset(kt for _h, kt in HMACS.values())
#: generic secrets and HMAC keys: bytes
SECRET_MIN, SECRET_MAX = 1, 512
MECHANISMS: dict[int, tuple[int, int, int]] = {
    **{m: (SECRET_MIN, SECRET_MAX, F_SIGN | F_VERIFY) for m in HMACS},
    **{m: (0, 0, F_DIGEST) for m in HASHES},
    CKM_GENERIC_SECRET_KEY_GEN: (SECRET_MIN, SECRET_MAX, F_GENERATE),
}


class Hmac(Operation):
    def __init__(self, mech: int, param: Any, key: bytes) -> None:
        no_param(param)
        self.mech, self.key = mech, key
        self.ctx = hmac.HMAC(key, HASHES[HMACS[mech][0]]())

    def update(self, chunk: bytes) -> None:
        self.ctx.update(chunk)

    def out_len(self) -> int:
        return self.ctx.algorithm.digest_size

    def sign(self) -> bytes:
        return self.ctx.copy().finalize()

    def verify(self, signature: bytes) -> None:
        if len(signature) != self.out_len():
            raise fail(ckr.SIGNATURE_LEN_RANGE)
        if not std_hmac.compare_digest(self.sign(), signature):
            raise fail(ckr.SIGNATURE_INVALID)


class Digest(Operation):
    def __init__(self, mech: int, param: Any) -> None:
        no_param(param)
        self.mech, self.key = mech, None
        self.ctx = hashes.Hash(HASHES[mech]())

    def update(self, chunk: bytes) -> None:
        self.ctx.update(chunk)

    def digest(self) -> bytes:
        return self.ctx.copy().finalize()


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    if kind == "digest":
        return Digest(mech, param)
    if not isinstance(key, bytes):
        raise fail(ckr.KEY_TYPE_INCONSISTENT)
    return Hmac(mech, param, key)

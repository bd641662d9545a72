"""What every soft token mechanism family shares: flags, hashes, the operation shape."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes

from ...codec import ckr
from ...errors import Pkcs11Error

# CKF_ mechanism flags
F_ENCRYPT, F_DECRYPT, F_DIGEST, F_SIGN, F_VERIFY = 0x100, 0x200, 0x400, 0x800, 0x2000
F_GENERATE, F_GENERATE_KEY_PAIR, F_WRAP, F_UNWRAP, F_DERIVE = (
    0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
F_EC = 0x100000 | 0x800000 | 0x1000000  # EC_F_P, EC_NAMEDCURVE, EC_UNCOMPRESS

CKM_SHA_1, CKM_SHA224, CKM_SHA256, CKM_SHA384, CKM_SHA512 = 0x220, 0x255, 0x250, 0x260, 0x270
HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    CKM_SHA_1: hashes.SHA1, CKM_SHA224: hashes.SHA224, CKM_SHA256: hashes.SHA256,
    CKM_SHA384: hashes.SHA384, CKM_SHA512: hashes.SHA512,
}
#: CKG_MGF1_* → hash
MGFS: dict[int, type[hashes.HashAlgorithm]] = {
    1: hashes.SHA1, 5: hashes.SHA224, 2: hashes.SHA256, 3: hashes.SHA384, 4: hashes.SHA512,
}
#: raw (one-part) mechanisms and buffered decryptions hold at most this much input
MAX_DATA = 1 << 20


def fail(rv: int, detail: str = "") -> Pkcs11Error:
    return Pkcs11Error(rv, detail)


def no_param(param: Any) -> None:
    if param not in (None, b""):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "this mechanism takes no parameter")


class Operation:
    """One active operation. Families override what their mechanism does; anything a
    mechanism cannot do is an error, never a silent no-op."""

    mech: int
    key: Any
    #: PKCS#11 says this mechanism is single-part (raw RSA, raw ECDSA, EdDSA, ...)
    single_part = False
    #: (call tag, input, output) of an answer held back by a size query, so the call
    #: that follows with the same input gets the same bytes without redoing the work
    cached: tuple[str, bytes, bytes] | None = None
    #: Update was called: a one-part call may no longer follow
    started = False
    #: slow enough (RSA private key operations) to run in a thread, off the event loop
    slow = False

    def held_bytes(self) -> int:
        """The bytes this operation keeps between calls (counted against the token's
        budget: token_backend.HeldBudget)."""
        c = self.cached
        return len(c[1]) + len(c[2]) if c is not None else 0

    def update(self, chunk: bytes) -> None:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def out_len(self) -> int:
        """The signature length (sign operations)."""
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def sign(self) -> bytes:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def verify(self, signature: bytes) -> None:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def crypt_update(self, chunk: bytes) -> bytes:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def crypt_final(self) -> bytes:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)

    def crypt_once(self, data: bytes) -> bytes:
        return self.crypt_update(data) + self.crypt_final()

    def digest(self) -> bytes:
        raise fail(ckr.FUNCTION_NOT_SUPPORTED)


class Buffered(Operation):
    """An operation over all of its input at once (hashes are not streamed)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def held_bytes(self) -> int:
        return super().held_bytes() + len(self.data)

    def update(self, chunk: bytes) -> None:
        if len(self.data) + len(chunk) > MAX_DATA:
            raise fail(ckr.DATA_LEN_RANGE)
        self.data += chunk

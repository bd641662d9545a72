"""AES: ECB, CBC, CBC-PAD, CTR, GCM (multi-part) and RFC 3394/5649 key wrap."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import keywrap, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ...codec import ckr
from ...codec.values import CtrParams, GcmParams, IvParams
from .mechbase import (
    F_DECRYPT,
    F_ENCRYPT,
    F_GENERATE,
    F_UNWRAP,
    F_WRAP,
    MAX_DATA,
    Operation,
    fail,
    no_param,
)

CKM_AES_KEY_GEN, CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CBC_PAD = 0x1080, 0x1081, 0x1082, 0x1085
CKM_AES_CTR, CKM_AES_GCM = 0x1086, 0x1087
CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD = 0x2109, 0x210A
_ED = F_ENCRYPT | F_DECRYPT
MECHANISMS: dict[int, tuple[int, int, int]] = {
    CKM_AES_KEY_GEN: (16, 32, F_GENERATE),
    CKM_AES_ECB: (16, 32, _ED | F_WRAP | F_UNWRAP),
    CKM_AES_CBC: (16, 32, _ED | F_WRAP | F_UNWRAP),
    CKM_AES_CBC_PAD: (16, 32, _ED | F_WRAP | F_UNWRAP),
    CKM_AES_CTR: (16, 32, _ED),
    CKM_AES_GCM: (16, 32, _ED),
    CKM_AES_KEY_WRAP: (16, 32, _ED | F_WRAP | F_UNWRAP),
    CKM_AES_KEY_WRAP_PAD: (16, 32, _ED | F_WRAP | F_UNWRAP),
}
MAX_GCM_IV = 256  # bytes; SoftHSM and NIST allow longer, nothing real uses them
BLOCK = 16
_DEFAULT_KW_IV = bytes.fromhex("a6a6a6a6a6a6a6a6")


def _iv(param: Any) -> bytes:
    iv = param.iv if isinstance(param, IvParams) else param
    if not isinstance(iv, bytes) or len(iv) != BLOCK:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "a 16-byte IV")
    return iv


def _ctr(param: Any) -> tuple[bytes, int]:
    """The counter block and how many blocks may follow before the counter wraps
    (cryptography counts over all 128 bits; PKCS#11 over ulCounterBits)."""
    if not isinstance(param, CtrParams) or not isinstance(param.cb, bytes) \
            or len(param.cb) != BLOCK or not 1 <= param.counter_bits <= 128:
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_AES_CTR_PARAMS")
    mask = (1 << param.counter_bits) - 1
    return param.cb, mask + 1 - (int.from_bytes(param.cb, "big") & mask)


def _gcm(param: Any) -> GcmParams:
    if (not isinstance(param, GcmParams) or not param.iv or len(param.iv) > MAX_GCM_IV
            or param.tag_bits not in (32, 64, 96, 104, 112, 120, 128)
            or param.iv_bits not in (0, len(param.iv) * 8)
            or len(param.aad or b"") > MAX_DATA):
        raise fail(ckr.MECHANISM_PARAM_INVALID, "CK_GCM_PARAMS")
    return param


class AesCipher(Operation):
    """ECB, CBC, CBC-PAD and CTR, in any number of parts."""

    def __init__(self, mech: int, param: Any, key: bytes, encrypt: bool) -> None:
        self.mech, self.key, self.encrypting = mech, key, encrypt
        self.padder: Any = None
        self.blocks_left: int | None = None
        if mech == CKM_AES_ECB:
            no_param(param)
            mode: modes.Mode = modes.ECB()
        elif mech == CKM_AES_CTR:
            cb, self.blocks_left = _ctr(param)
            mode = modes.CTR(cb)
        else:
            mode = modes.CBC(_iv(param))
            if mech == CKM_AES_CBC_PAD:
                self.padder = (padding.PKCS7(128).padder() if encrypt
                               else padding.PKCS7(128).unpadder())
        c: Any = Cipher(algorithms.AES(key), mode)
        self.ctx: Any = c.encryptor() if encrypt else c.decryptor()
        self.total = 0

    def crypt_update(self, chunk: bytes) -> bytes:
        self.total += len(chunk)
        if self.blocks_left is not None and self.total > self.blocks_left * BLOCK:
            raise fail(ckr.DATA_LEN_RANGE, "the CTR counter would wrap")
        if self.padder is not None and self.encrypting:
            return self.ctx.update(self.padder.update(chunk))
        out = self.ctx.update(chunk)
        if self.padder is not None:
            return self.padder.update(out)
        return out

    def crypt_final(self) -> bytes:
        try:
            if self.padder is not None and self.encrypting:
                tail = self.padder.finalize()
                return self.ctx.update(tail) + self.ctx.finalize()
            out = self.ctx.finalize()
            if self.padder is not None:
                return self.padder.update(out) + self.padder.finalize()
            return out
        except ValueError:
            raise fail(ckr.DATA_LEN_RANGE if self.encrypting else
                       ckr.ENCRYPTED_DATA_INVALID if self.padder is not None
                       else ckr.ENCRYPTED_DATA_LEN_RANGE) from None

    def crypt_once(self, data: bytes) -> bytes:
        if self.mech in (CKM_AES_ECB, CKM_AES_CBC) and len(data) % BLOCK:
            raise fail(ckr.DATA_LEN_RANGE if self.encrypting else ckr.ENCRYPTED_DATA_LEN_RANGE)
        if self.mech == CKM_AES_CBC_PAD and not self.encrypting and (
                not data or len(data) % BLOCK):
            raise fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
        return self.crypt_update(data) + self.crypt_final()


class AesGcm(Operation):
    """GCM: encryption streams, the tag comes last; decryption holds the input until
    the final part, since nothing may be released before the tag is checked."""

    def __init__(self, mech: int, param: Any, key: bytes, encrypt: bool) -> None:
        self.mech, self.key, self.encrypting = mech, key, encrypt
        self.p = _gcm(param)
        self.tag_len = self.p.tag_bits // 8
        self.held = bytearray()
        if encrypt:
            self.ctx: Any = Cipher(algorithms.AES(key), modes.GCM(self.p.iv or b"")).encryptor()
            if self.p.aad:
                self.ctx.authenticate_additional_data(self.p.aad)

    def held_bytes(self) -> int:
        return super().held_bytes() + len(self.held) + len(self.p.aad or b"")

    def crypt_update(self, chunk: bytes) -> bytes:
        if self.encrypting:
            return self.ctx.update(chunk)
        if len(self.held) + len(chunk) > MAX_DATA:
            raise fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
        self.held += chunk
        return b""

    def crypt_final(self) -> bytes:
        if self.encrypting:
            out = self.ctx.finalize()
            return out + self.ctx.tag[: self.tag_len]
        data, t = bytes(self.held), self.tag_len
        if len(data) < t:
            raise fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
        try:
            dec = Cipher(algorithms.AES(self.key),
                         modes.GCM(self.p.iv or b"", data[len(data) - t:], min_tag_length=t)
                         ).decryptor()
            if self.p.aad:
                dec.authenticate_additional_data(self.p.aad)
            return dec.update(data[: len(data) - t]) + dec.finalize()
        except (InvalidTag, ValueError):
            raise fail(ckr.ENCRYPTED_DATA_INVALID) from None


def _kw_param(mech: int, param: Any) -> None:
    """Only the default RFC 3394 / 5649 initial values are supported."""
    iv = param.iv if isinstance(param, IvParams) else param
    if iv in (None, b""):
        return
    if mech == CKM_AES_KEY_WRAP and iv == _DEFAULT_KW_IV:
        return
    raise fail(ckr.MECHANISM_PARAM_INVALID, "only the default key wrap IV")


class AesKeyWrap(Operation):
    """CKM_AES_KEY_WRAP(_PAD) as a single-part cipher (C_Encrypt on a key wraps it)."""

    single_part = True

    def __init__(self, mech: int, param: Any, key: bytes, encrypt: bool) -> None:
        _kw_param(mech, param)
        self.mech, self.key, self.encrypting = mech, key, encrypt

    def crypt_once(self, data: bytes) -> bytes:
        return (wrap if self.encrypting else unwrap)(self.mech, self.key, data)


def wrap(mech: int, kek: bytes, data: bytes) -> bytes:
    if mech == CKM_AES_KEY_WRAP_PAD:
        if not data:
            raise fail(ckr.DATA_LEN_RANGE)
        return keywrap.aes_key_wrap_with_padding(kek, data)
    if len(data) < 16 or len(data) % 8:
        raise fail(ckr.DATA_LEN_RANGE, "RFC 3394 wraps multiples of 8 bytes, 16 or more")
    return keywrap.aes_key_wrap(kek, data)


def unwrap(mech: int, kek: bytes, data: bytes) -> bytes:
    if len(data) < 16 or len(data) % 8:
        raise fail(ckr.ENCRYPTED_DATA_LEN_RANGE)
    try:
        if mech == CKM_AES_KEY_WRAP_PAD:
            return keywrap.aes_key_unwrap_with_padding(kek, data)
        return keywrap.aes_key_unwrap(kek, data)
    except (keywrap.InvalidUnwrap, ValueError):
        raise fail(ckr.ENCRYPTED_DATA_INVALID) from None


def start(mech: int, param: Any, key: Any, kind: str) -> Operation:
    if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
        raise fail(ckr.KEY_TYPE_INCONSISTENT)
    enc = kind == "encrypt"
    if mech == CKM_AES_GCM:
        return AesGcm(mech, param, key, enc)
    if mech in (CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD):
        return AesKeyWrap(mech, param, key, enc)
    return AesCipher(mech, param, key, enc)

"""Soft token calls that run a mechanism: sign/verify, encrypt/decrypt, digest (one
part or Update/Final), C_DigestKey, random. Output buffers follow PKCS#11: a NULL buffer
asks the length, a short one gives CKR_BUFFER_TOO_SMALL, and both keep the operation."""

from __future__ import annotations

import asyncio
from typing import Any

from ...codec import ckr
from ...errors import Pkcs11Error
from . import mechanisms as M
from . import objects as O
from .objects import SoftObject
from .token import EMPTY_BUFFER, Session, SoftToken, out_buffer

MAX_RANDOM = 1 << 20
_PURPOSE = {"sign": (O.CKA_SIGN, M.F_SIGN), "verify": (O.CKA_VERIFY, M.F_VERIFY),
            "encrypt": (O.CKA_ENCRYPT, M.F_ENCRYPT), "decrypt": (O.CKA_DECRYPT, M.F_DECRYPT)}
_ASYMMETRIC = {O.CKK_RSA, O.CKK_EC, M.CKK_EC_EDWARDS}
#: what an asymmetric key object must be for each operation
_NEEDS_PRIVATE = {"sign": True, "decrypt": True, "verify": False, "encrypt": False}


def mech_of(m: Any) -> tuple[int, Any]:
    if m is None or not isinstance(m[0], int):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "mechanism")
    return m[0], m[1]


def crypto_key(t: SoftToken, o: SoftObject) -> Any:
    """The key of an object as `cryptography` takes it (bytes for secret keys),
    opened once per login."""
    cached = o.extra.get("key")
    if cached is not None:
        return cached
    if o.cls == O.CKO_PUBLIC_KEY:
        key: Any = M.public_from_attrs(int(o.attrs.get(O.CKA_KEY_TYPE, -1)), o.attrs)
    elif o.cls == O.CKO_PRIVATE_KEY:
        key = M.load_private(t.key_value(o))
    elif o.cls == O.CKO_SECRET_KEY:
        key = t.key_value(o)
    else:
        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
    o.extra["key"] = key
    return key


def check_key(o: SoftObject, mech: int, kind: str | None, need_private: bool | None) -> None:
    """The key object may serve this mechanism: its class, CKA_KEY_TYPE."""
    if o.cls not in (O.CKO_PUBLIC_KEY, O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
    kt = o.attrs.get(O.CKA_KEY_TYPE)
    if kt not in M.key_types(mech):
        raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT, "key type and mechanism")
    if kt in _ASYMMETRIC and need_private is not None and \
            (o.cls == O.CKO_PRIVATE_KEY) != need_private:
        raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT, "public or private key")


def _count(t: SoftToken, s: Session, kind: str, op: M.Operation, before: int) -> None:
    """Count what a call made ``op`` keep (``before``: what it kept at the call's start)
    against the token's budget; past it the operation ends (CKR_DEVICE_MEMORY)."""
    grown = op.held_bytes() - before
    if grown > 0:
        try:
            t.held.take(grown)
        except Pkcs11Error:
            s.ops.pop(kind, None)
            raise


def op_init(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    if kind in s.ops:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    mech, param = mech_of(args[1])
    info = M.MECHANISMS.get(mech)
    if info is None:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    if kind == "digest":
        s.ops[kind] = M.start(mech, param, None, kind)
        return []
    attr, want = _PURPOSE[kind]
    if not info[2] & want:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    o = t.obj(args[2], ckr.KEY_HANDLE_INVALID)
    if not o.flag(attr):
        if o.cls == O.CKO_PUBLIC_KEY and kind in ("sign", "decrypt"):
            raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT)
        raise Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED)
    check_key(o, mech, kind, _NEEDS_PRIVATE[kind])
    s.ops[kind] = op = M.start(mech, param, crypto_key(t, o), kind)
    _count(t, s, kind, op, 0)  # GCM's additional data
    return []


def _op(t: SoftToken, kind: str, h: Any) -> tuple[Session, M.Operation]:
    s = t.session(h)
    op = s.ops.get(kind)
    if op is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    return s, op


def _data(v: Any) -> bytes:
    if v is None:
        return b""
    if not isinstance(v, bytes):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "data")
    return v


def _multi_part(op: M.Operation) -> None:
    if op.single_part:
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "a single-part mechanism")
    if op.cached is not None:
        # a size query of the Final kept its result: more input would not be in it (the
        # retry would get the digest of less than was sent)
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "the size query already ended the input")
    op.started = True


def op_update(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    """C_SignUpdate, C_VerifyUpdate, C_DigestUpdate."""
    s, op = _op(t, kind, args[0])
    before = op.held_bytes()
    try:
        _multi_part(op)
        op.update(_data(args[1]))
    except Pkcs11Error:
        s.ops.pop(kind, None)
        raise
    _count(t, s, kind, op, before)
    return []


def _answer(t: SoftToken, s: Session, kind: str, op: M.Operation, tag: str, data: bytes, cap: Any,
            produce: Any, last: bool) -> list[Any]:
    """Reply with produce()'s bytes, or with their length when the buffer is a query
    or too small; the bytes are then held for the call that repeats this one."""
    before = op.held_bytes()
    if op.cached is not None:
        ctag, cin, result = op.cached
        if (ctag, cin) != (tag, data):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "not the call the size query was for")
    else:
        result = produce()
    done, value = out_buffer(cap, result)
    op.cached = None if done else (tag, data, result)
    if done and last:
        s.ops.pop(kind, None)
    else:
        _count(t, s, kind, op, before)
    return [value]


def _sig_query(cap: Any, n: int) -> bool:
    return bool(cap == 0 or (cap == EMPTY_BUFFER and n) or (isinstance(cap, int) and cap < n))


async def _finish(t: SoftToken, kind: str, h: Any, cap: Any, data: bytes | None) -> list[Any]:
    """Sign/digest/encrypt/decrypt, one part (data given) or the final part."""
    s, op = _op(t, kind, h)
    try:
        if data is not None and op.started:
            raise Pkcs11Error(ckr.OPERATION_ACTIVE, "Update already called")
        if data is None and op.single_part:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "a single-part mechanism")
        if kind == "sign":
            n = op.out_len()
            if _sig_query(cap, n):  # the length is known without signing
                return [out_buffer(cap, b"\0" * n)[1]]
            if data is not None:
                op.update(data)
            result = await asyncio.to_thread(op.sign)
            return _answer(t, s, kind, op, "sign", b"", cap, lambda: result, True)
        if kind == "digest":
            def digest() -> bytes:
                if data is not None:
                    op.update(data)
                return op.digest()
            return _answer(t, s, kind, op, "final", data or b"", cap, digest, True)
        if data is None:
            return _answer(t, s, kind, op, "final", b"", cap, op.crypt_final, True)
        chunk = data
        if op.slow and op.cached is None:
            result = await asyncio.to_thread(op.crypt_once, chunk)
            return _answer(t, s, kind, op, "once", chunk, cap, lambda: result, True)
        return _answer(t, s, kind, op, "once", chunk, cap, lambda: op.crypt_once(chunk), True)
    except Pkcs11Error as e:
        if e.rv != ckr.BUFFER_TOO_SMALL:
            s.ops.pop(kind, None)
        raise


async def one_part(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    return await _finish(t, kind, args[0], args[2], _data(args[1]))


async def final(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    return await _finish(t, kind, args[0], args[1], None)


def crypt_update(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    """C_EncryptUpdate, C_DecryptUpdate."""
    s, op = _op(t, kind, args[0])
    chunk = _data(args[1])
    try:
        if op.cached is None:
            _multi_part(op)
        return _answer(t, s, kind, op, "update", chunk, args[2],
                       lambda: op.crypt_update(chunk), False)
    except Pkcs11Error:
        s.ops.pop(kind, None)
        raise


def verify(t: SoftToken, args: list[Any]) -> list[Any]:
    s, op = _op(t, "verify", args[0])
    try:
        if op.started:
            raise Pkcs11Error(ckr.OPERATION_ACTIVE, "Update already called")
        op.update(_data(args[1]))
        op.verify(_data(args[2]))
    finally:
        s.ops.pop("verify", None)
    return []


def verify_final(t: SoftToken, args: list[Any]) -> list[Any]:
    s, op = _op(t, "verify", args[0])
    try:
        if op.single_part:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "a single-part mechanism")
        op.verify(_data(args[1]))
    finally:
        s.ops.pop("verify", None)
    return []


def digest_key(t: SoftToken, args: list[Any]) -> list[Any]:
    """C_DigestKey: only an extractable secret key, since its digest tells as much about
    the key as wrapping it would."""
    s, op = _op(t, "digest", args[0])
    try:
        o = t.obj(args[1], ckr.KEY_HANDLE_INVALID)
        if o.cls != O.CKO_SECRET_KEY or not o.flag(O.CKA_EXTRACTABLE):
            raise Pkcs11Error(ckr.KEY_INDIGESTIBLE)
        _multi_part(op)
        op.update(t.key_value(o))
    except Pkcs11Error:
        s.ops.pop("digest", None)
        raise
    return []


def generate_random(t: SoftToken, args: list[Any]) -> list[Any]:
    t.session(args[0])
    n = args[1]
    if not isinstance(n, int) or n < 0:
        raise Pkcs11Error(ckr.ARGUMENTS_BAD)
    if n == 0:
        # a NULL buffer: no size query for random data; SoftHSM answers the same
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "NULL random buffer")
    if n == EMPTY_BUFFER:
        return [b""]
    if n > MAX_RANDOM:
        raise Pkcs11Error(ckr.DATA_LEN_RANGE)
    return [M.random_bytes(n)]

"""Soft token calls on objects and keys: create, find, attributes, key generation,
sign/verify, encrypt/decrypt, digest, random."""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...codec import ckr
from ...errors import Pkcs11Error
from . import mechanisms as M
from . import objects as O
from .objects import Attrs, SoftObject
from .token import EMPTY_BUFFER, SoftToken, out_buffer

MAX_FIND = 1 << 16
MAX_RANDOM = 1 << 20


def _mech(m: Any) -> tuple[int, Any]:
    if m is None or not isinstance(m[0], int):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "mechanism")
    return m[0], m[1]


async def _add(t: SoftToken, s: int | None, attrs: Attrs, value: bytes | None) -> int:
    """Store one object (token objects in the file, session objects in memory)."""
    if attrs.get(O.CKA_TOKEN):
        sealed = None
        if value is not None and t.token_key is None:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        h, sealed = t.store.add(attrs, value, t.token_key)
        t.objects[h] = SoftObject(h, attrs, sealed=sealed)
        return h
    h = t.next_object_handle()
    t.objects[h] = SoftObject(h, attrs, value=value, session=s)
    return h


def _cls_of(tpl: Attrs, default: int | None = None) -> int:
    cls = tpl.get(O.CKA_CLASS, default)
    if cls is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_CLASS")
    return int(cls)


async def create_object(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    tpl = O.parse_template(args[1])
    cls = _cls_of(tpl)
    if cls == O.CKO_PRIVATE_KEY:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "private keys are generated, not imported")
    O.check_allowed(cls, tpl)
    attrs = O.with_defaults(cls, tpl)
    value: bytes | None = None
    kt = attrs.get(O.CKA_KEY_TYPE)
    if cls == O.CKO_CERTIFICATE and attrs[O.CKA_CERTIFICATE_TYPE] != O.CKC_X_509:
        raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "only X.509 certificates")
    if cls == O.CKO_PUBLIC_KEY:
        if kt not in (O.CKK_RSA, O.CKK_EC):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "RSA or EC public keys")
        key = M.public_from_attrs(int(kt), attrs)
        if isinstance(key, rsa.RSAPublicKey):
            attrs[O.CKA_MODULUS_BITS] = key.key_size
    elif cls == O.CKO_SECRET_KEY:
        v = attrs.pop(O.CKA_VALUE, None)
        if not isinstance(v, bytes) or not v:
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE")
        if kt not in (O.CKK_AES, O.CKK_GENERIC_SECRET):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "AES or generic secret keys")
        if kt == O.CKK_AES and len(v) not in (16, 24, 32):
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "AES key length")
        if attrs.get(O.CKA_VALUE_LEN, len(v)) != len(v):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN")
        attrs[O.CKA_VALUE_LEN] = len(v)
        value = v
    elif cls == O.CKO_DATA and attrs[O.CKA_PRIVATE]:
        value = bytes(attrs.pop(O.CKA_VALUE))  # a private data object's value is sealed too
    t.may_write(s, bool(attrs[O.CKA_TOKEN]), bool(attrs[O.CKA_PRIVATE]))
    return [await _add(t, s.handle, attrs, value)]


def _readable(t: SoftToken, o: SoftObject) -> SoftObject:
    """The object as attributes are read and matched: a private data object with its
    sealed value opened (it is only visible to the logged-in user)."""
    if o.cls == O.CKO_DATA and (o.sealed is not None or o.value is not None):
        return SoftObject(o.handle, {**o.attrs, O.CKA_VALUE: t.key_value(o)})
    return o


def destroy_object(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    o = t.obj(args[1])
    t.may_write(s, o.token, o.private)
    if not o.flag(O.CKA_DESTROYABLE):
        raise Pkcs11Error(ckr.ACTION_PROHIBITED)
    if o.token:
        t.store.delete(o.handle)
    del t.objects[o.handle]
    return []


def get_attribute_value(t: SoftToken, args: list[Any]) -> list[Any]:
    t.session(args[0])
    o = t.obj(args[1])
    if not isinstance(args[2], list | tuple):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "template")
    attrs, rv = O.reply_attributes(_readable(t, o), args[2])
    return [attrs, rv]


def set_attribute_value(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    o = t.obj(args[1])
    tpl = O.parse_template(args[2])
    t.may_write(s, o.token, o.private)
    if not o.flag(O.CKA_MODIFIABLE):
        raise Pkcs11Error(ckr.ACTION_PROHIBITED)
    for a, v in tpl.items():
        if a not in O.SETTABLE:
            if a in O.ALLOWED.get(o.cls, frozenset()) and o.attrs.get(a) == v:
                continue  # setting a value to what it is changes nothing
            raise Pkcs11Error(ckr.ATTRIBUTE_READ_ONLY, f"attribute {a:#x}")
        if a == O.CKA_ID and o.cls in (O.CKO_DATA,):
            raise Pkcs11Error(ckr.ATTRIBUTE_TYPE_INVALID)
    new = {**o.attrs, **tpl}
    if o.token:
        t.store.update(o.handle, new)
    o.attrs = new
    return []


def find_init(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    if s.found is not None:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    tpl = O.parse_template(args[1] or [])
    s.found = [h for h, o in sorted(t.objects.items())
               if t.visible(o) and O.matches(_readable(t, o) if O.CKA_VALUE in tpl else o, tpl)]
    return []


def find(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    if s.found is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    n = args[1]
    if not isinstance(n, int) or n < 0:
        raise Pkcs11Error(ckr.ARGUMENTS_BAD)
    n = min(n, MAX_FIND)
    out, s.found = s.found[:n], s.found[n:]
    return [out]


def find_final(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    if s.found is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    s.found = None
    return []


# ------------------------------------------------------------------ key generation


def _keygen_tpl(t: SoftToken, raw: Any, cls: int) -> Attrs:
    tpl = O.parse_template(raw or [])
    if _cls_of(tpl, cls) != cls:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_CLASS")
    O.check_allowed(cls, tpl, generated=True)
    for a in (O.CKA_LOCAL, O.CKA_KEY_GEN_MECHANISM, O.CKA_ALWAYS_SENSITIVE,
              O.CKA_NEVER_EXTRACTABLE):
        tpl.pop(a, None)
    return tpl


async def generate_key_pair(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    mech, _param = _mech(args[1])
    pub_t = _keygen_tpl(t, args[2], O.CKO_PUBLIC_KEY)
    priv_t = _keygen_tpl(t, args[3], O.CKO_PRIVATE_KEY)
    if mech == M.CKM_EC_KEY_PAIR_GEN:
        kt = O.CKK_EC
        params = pub_t.get(O.CKA_EC_PARAMS)
        if not isinstance(params, bytes):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS")
        priv_key: M.PrivKey = M.generate_ec(params)
    elif mech == M.CKM_RSA_PKCS_KEY_PAIR_GEN:
        kt = O.CKK_RSA
        bits = pub_t.pop(O.CKA_MODULUS_BITS, None) if O.CKA_MODULUS_BITS in pub_t else None
        if not isinstance(bits, int):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_MODULUS_BITS")
        e = pub_t.get(O.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")
        assert isinstance(e, bytes)
        exponent = int.from_bytes(e, "big")
        if not M.RSA_MIN <= bits <= M.RSA_MAX:
            raise Pkcs11Error(ckr.KEY_SIZE_RANGE, f"RSA {bits} bits")
        priv_key = await asyncio.to_thread(M.generate_rsa, bits, exponent)
    else:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    for tpl in (pub_t, priv_t):
        if tpl.get(O.CKA_KEY_TYPE, kt) != kt:
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
    gen: Attrs = {O.CKA_KEY_TYPE: kt, O.CKA_LOCAL: 1, O.CKA_KEY_GEN_MECHANISM: mech}
    pub_a = O.with_defaults(O.CKO_PUBLIC_KEY, pub_t | gen)
    priv_a = O.with_defaults(O.CKO_PRIVATE_KEY, priv_t | gen)
    pub_key = priv_key.public_key()
    if isinstance(pub_key, ec.EllipticCurvePublicKey):
        pub_a[O.CKA_EC_POINT] = M.ec_point(pub_key)
        priv_a[O.CKA_EC_PARAMS] = pub_a[O.CKA_EC_PARAMS]
    else:
        nums = pub_key.public_numbers()
        for a in (pub_a, priv_a):
            a[O.CKA_MODULUS] = M.int_bytes(nums.n)
            a[O.CKA_PUBLIC_EXPONENT] = M.int_bytes(nums.e)
        pub_a[O.CKA_MODULUS_BITS] = pub_key.key_size
    t.may_write(s, bool(pub_a[O.CKA_TOKEN]), bool(pub_a[O.CKA_PRIVATE]))
    t.may_write(s, bool(priv_a[O.CKA_TOKEN]), bool(priv_a[O.CKA_PRIVATE]))
    t.session(s.handle)  # still open after the keygen thread?
    ph = await _add(t, s.handle, pub_a, None)
    try:
        kh = await _add(t, s.handle, priv_a, M.private_der(priv_key))
    except Exception:
        destroy_object(t, [s.handle, ph])
        raise
    return [ph, kh]


async def generate_key(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    mech, _param = _mech(args[1])
    if mech != M.CKM_AES_KEY_GEN:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    tpl = _keygen_tpl(t, args[2], O.CKO_SECRET_KEY)
    if O.CKA_VALUE in tpl:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE")
    n = tpl.get(O.CKA_VALUE_LEN)
    if n is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN")
    if n not in (16, 24, 32):
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE)
    if tpl.get(O.CKA_KEY_TYPE, O.CKK_AES) != O.CKK_AES:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
    attrs = O.with_defaults(O.CKO_SECRET_KEY, tpl | {
        O.CKA_KEY_TYPE: O.CKK_AES, O.CKA_LOCAL: 1, O.CKA_KEY_GEN_MECHANISM: mech})
    t.may_write(s, bool(attrs[O.CKA_TOKEN]), bool(attrs[O.CKA_PRIVATE]))
    return [await _add(t, s.handle, attrs, M.random_bytes(int(n)))]


# ------------------------------------------------------------------ operations

_PURPOSE = {"sign": O.CKA_SIGN, "verify": O.CKA_VERIFY, "encrypt": O.CKA_ENCRYPT,
            "decrypt": O.CKA_DECRYPT}


def _crypto_key(t: SoftToken, o: SoftObject) -> Any:
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


def op_init(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    if kind in s.ops:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    mech, param = _mech(args[1])
    if mech not in M.MECHANISMS:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    if kind == "digest":
        s.ops[kind] = M.start(mech, param, None, kind)
        return []
    info = M.MECHANISMS[mech][2]
    want = {"sign": M.F_SIGN, "verify": M.F_VERIFY, "encrypt": M.F_ENCRYPT,
            "decrypt": M.F_DECRYPT}[kind]
    if not info & want:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    o = t.obj(args[2], ckr.KEY_HANDLE_INVALID)
    if o.cls not in (O.CKO_PUBLIC_KEY, O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
    if not o.flag(_PURPOSE[kind]):
        raise Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED)
    if kind == "sign" and o.cls == O.CKO_PUBLIC_KEY:
        raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT)
    s.ops[kind] = M.start(mech, param, _crypto_key(t, o), kind)
    return []


def _op(t: SoftToken, kind: str, h: Any) -> tuple[Any, M.Operation]:
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


def op_update(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    s, op = _op(t, kind, args[0])
    try:
        op.update(_data(args[1]))
    except Pkcs11Error:
        s.ops.pop(kind, None)
        raise
    return []


async def _finish(t: SoftToken, kind: str, h: Any, cap: Any, data: bytes | None) -> list[Any]:
    """Sign/digest/encrypt/decrypt, one part (data given) or the final part."""
    s, op = _op(t, kind, h)
    try:
        if data is not None:
            if kind in ("sign", "digest"):
                if op.hasher is None and op.data:
                    raise Pkcs11Error(ckr.OPERATION_ACTIVE)
        if kind == "sign":
            n = M.signature_length(op.key)
            if cap == 0 or (cap == EMPTY_BUFFER and n) or (isinstance(cap, int) and cap < n):
                return [out_buffer(cap, b"\0" * n)[1]]
            if data is not None:
                op.update(data)
            result = await asyncio.to_thread(M.sign, op)
        elif kind == "digest":
            h2 = op.hasher.copy()
            if data is not None:
                h2.update(data)
            result = h2.digest()
        else:
            if data is None:
                raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "multi-part ciphers")
            fn = M.encrypt if kind == "encrypt" else M.decrypt
            result = fn(op, data)
        done, value = out_buffer(cap, result)
        if done:
            s.ops.pop(kind, None)
        return [value]
    except Pkcs11Error:
        s.ops.pop(kind, None)
        raise


async def one_part(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    return await _finish(t, kind, args[0], args[2], _data(args[1]))


async def final(t: SoftToken, kind: str, args: list[Any]) -> list[Any]:
    return await _finish(t, kind, args[0], args[1], None)


def verify(t: SoftToken, args: list[Any]) -> list[Any]:
    s, op = _op(t, "verify", args[0])
    try:
        op.update(_data(args[1]))
        M.verify(op, _data(args[2]))
    finally:
        s.ops.pop("verify", None)
    return []


def verify_final(t: SoftToken, args: list[Any]) -> list[Any]:
    s, op = _op(t, "verify", args[0])
    try:
        M.verify(op, _data(args[1]))
    finally:
        s.ops.pop("verify", None)
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

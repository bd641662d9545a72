"""Soft token calls on objects and keys: create, find, attributes, key generation
(mechanisms run in crypto_ops.py, wrap and derive in wrap_derive.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ...codec import ckr
from ...errors import Pkcs11Error
from . import mechanisms as M
from . import objects as O
from .crypto_ops import mech_of
from .hmac_digest import HMAC_KEY_TYPES, SECRET_MAX, SECRET_MIN
from .objects import Attrs, SoftObject
from .store import SO
from .token import SoftToken

MAX_FIND = 1 << 16
MAX_RANDOM = 1 << 20


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


async def create_key_object(t: SoftToken, s: Any, attrs: Attrs, value: bytes) -> int:
    """Store a key made by unwrapping or derivation, where the session may write it."""
    t.may_write(s, bool(attrs[O.CKA_TOKEN]), bool(attrs[O.CKA_PRIVATE]))
    return await _add(t, s.handle, attrs, value)


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
    O.check_allowed(cls, tpl, so=t.login == SO)
    attrs = O.with_defaults(cls, tpl)
    value: bytes | None = None
    kt = attrs.get(O.CKA_KEY_TYPE)
    if cls == O.CKO_CERTIFICATE and attrs[O.CKA_CERTIFICATE_TYPE] != O.CKC_X_509:
        raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "only X.509 certificates")
    if cls == O.CKO_PUBLIC_KEY:
        if kt not in (O.CKK_RSA, O.CKK_EC, M.CKK_EC_EDWARDS):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "RSA, EC or EdDSA public keys")
        key = M.public_from_attrs(int(kt), attrs)
        if isinstance(key, rsa.RSAPublicKey):
            attrs[O.CKA_MODULUS_BITS] = key.key_size
    elif cls == O.CKO_SECRET_KEY:
        v = attrs.pop(O.CKA_VALUE, None)
        if not isinstance(v, bytes) or not v:
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE")
        if kt not in (O.CKK_AES, O.CKK_GENERIC_SECRET, *HMAC_KEY_TYPES):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "AES, generic secret or HMAC keys")
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
    O.check_allowed(cls, tpl, generated=True, so=t.login == SO)
    for a in (O.CKA_LOCAL, O.CKA_KEY_GEN_MECHANISM, O.CKA_ALWAYS_SENSITIVE,
              O.CKA_NEVER_EXTRACTABLE):
        tpl.pop(a, None)
    return tpl


def add_public_parts(priv_key: M.PrivKey, pub_a: Attrs | None, priv_a: Attrs,
                     params: Any) -> None:
    """The public values a key pair's objects show (CKA_MODULUS..., CKA_EC_POINT)."""
    pub_key = priv_key.public_key()
    if isinstance(pub_key, rsa.RSAPublicKey):
        nums = pub_key.public_numbers()
        for a in (pub_a, priv_a):
            if a is not None:
                a[O.CKA_MODULUS] = M.int_bytes(nums.n)
                a[O.CKA_PUBLIC_EXPONENT] = M.int_bytes(nums.e)
        if pub_a is not None:
            pub_a[O.CKA_MODULUS_BITS] = pub_key.key_size
        return
    priv_a[O.CKA_EC_PARAMS] = params
    if pub_a is not None:
        pub_a[O.CKA_EC_POINT] = M.ec_point(pub_key)


async def generate_key_pair(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    mech, _param = mech_of(args[1])
    pub_t = _keygen_tpl(t, args[2], O.CKO_PUBLIC_KEY)
    priv_t = _keygen_tpl(t, args[3], O.CKO_PRIVATE_KEY)
    if mech == M.CKM_EC_KEY_PAIR_GEN:
        kt = O.CKK_EC
        params = pub_t.get(O.CKA_EC_PARAMS)
        if not isinstance(params, bytes):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS")
        priv_key: M.PrivKey = M.generate_ec(params)
    elif mech == M.CKM_EC_EDWARDS_KEY_PAIR_GEN:
        kt = M.CKK_EC_EDWARDS
        params = pub_t.get(O.CKA_EC_PARAMS)
        if not isinstance(params, bytes):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS")
        priv_key = M.generate_edwards(params)
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
    add_public_parts(priv_key, pub_a, priv_a, pub_t.get(O.CKA_EC_PARAMS))
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
    mech, _param = mech_of(args[1])
    if mech == M.CKM_AES_KEY_GEN:
        kt, sizes = O.CKK_AES, range(16, 33, 8)
        allowed_types = {O.CKK_AES}
    elif mech == M.CKM_GENERIC_SECRET_KEY_GEN:
        kt, sizes = O.CKK_GENERIC_SECRET, range(SECRET_MIN, SECRET_MAX + 1)
        allowed_types = {O.CKK_GENERIC_SECRET, *HMAC_KEY_TYPES}
    else:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    tpl = _keygen_tpl(t, args[2], O.CKO_SECRET_KEY)
    if O.CKA_VALUE in tpl:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE")
    n = tpl.get(O.CKA_VALUE_LEN)
    if n is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN")
    if n not in sizes:
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE)
    kt = int(tpl.get(O.CKA_KEY_TYPE, kt))
    if kt not in allowed_types:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
    attrs = O.with_defaults(O.CKO_SECRET_KEY, tpl | {
        O.CKA_KEY_TYPE: kt, O.CKA_LOCAL: 1, O.CKA_KEY_GEN_MECHANISM: mech})
    t.may_write(s, bool(attrs[O.CKA_TOKEN]), bool(attrs[O.CKA_PRIVATE]))
    return [await _add(t, s.handle, attrs, M.random_bytes(int(n)))]

"""C_WrapKey, C_UnwrapKey, C_DeriveKey on the soft token.

Wrapping is the only way a key value leaves the token (CKA_SENSITIVE is always true
here), so the rules are checked in full: CKA_WRAP/CKA_UNWRAP on the wrapping key,
CKA_EXTRACTABLE on the wrapped one, CKA_WRAP_WITH_TRUSTED against CKA_TRUSTED. A key
that arrives by unwrapping has been outside the token: it is never "always sensitive"
nor "never extractable"."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ...codec import ckr
from ...errors import Pkcs11Error
from . import aes
from . import ec as ecm
from . import mechanisms as M
from . import objects as O
from .crypto_ops import check_key, crypto_key, mech_of
from .hmac_digest import HMAC_KEY_TYPES, SECRET_MAX
from .objects import Attrs, SoftObject
from .ops import add_public_parts, create_key_object
from .store import SO
from .token import SoftToken, out_buffer

UNWRAPPING_KEY_HANDLE_INVALID = 0xF0
_SECRET_TYPES = {O.CKK_AES, O.CKK_GENERIC_SECRET, *HMAC_KEY_TYPES}
#: mechanisms that wrap only whole blocks, with no padding of their own
_BLOCK_ONLY = {aes.CKM_AES_ECB: 16, aes.CKM_AES_CBC: 16, aes.CKM_AES_KEY_WRAP: 8}
#: mechanisms that may carry a private key (PKCS#8); RSA can carry only secret keys
_CARRY_PRIVATE = {aes.CKM_AES_KEY_WRAP_PAD, aes.CKM_AES_CBC_PAD}


def _wrapping_key(t: SoftToken, h: Any, mech: int, flag: int, rv_handle: int,
                  rv_type: int, encrypt: bool) -> tuple[SoftObject, Any]:
    o = t.obj(h, rv_handle)
    if o.cls not in (O.CKO_PUBLIC_KEY, O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
        raise Pkcs11Error(rv_handle)
    if not o.flag(flag):
        raise Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED)
    try:
        check_key(o, mech, None, not encrypt)
    except Pkcs11Error:
        raise Pkcs11Error(rv_type) from None
    return o, crypto_key(t, o)


def wrap_key(t: SoftToken, args: list[Any]) -> list[Any]:
    t.session(args[0])
    mech, param = mech_of(args[1])
    info = M.MECHANISMS.get(mech)
    if info is None or not info[2] & M.F_WRAP:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    wk, kek = _wrapping_key(t, args[2], mech, O.CKA_WRAP, ckr.WRAPPING_KEY_HANDLE_INVALID,
                            ckr.WRAPPING_KEY_TYPE_INCONSISTENT, True)
    o = t.obj(args[3], ckr.KEY_HANDLE_INVALID)
    if o.cls not in (O.CKO_SECRET_KEY, O.CKO_PRIVATE_KEY):
        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
    if not o.flag(O.CKA_EXTRACTABLE):
        raise Pkcs11Error(ckr.KEY_UNEXTRACTABLE)
    if o.flag(O.CKA_WRAP_WITH_TRUSTED) and not wk.flag(O.CKA_TRUSTED):
        raise Pkcs11Error(ckr.KEY_NOT_WRAPPABLE, "CKA_WRAP_WITH_TRUSTED")
    if o.cls == O.CKO_PRIVATE_KEY:
        if mech not in _CARRY_PRIVATE:
            raise Pkcs11Error(ckr.KEY_NOT_WRAPPABLE, "private keys: AES key wrap with padding")
        value = M.private_der(crypto_key(t, o))
    else:
        value = t.key_value(o)
    block = _BLOCK_ONLY.get(mech)
    if block and len(value) % block:
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE, f"a multiple of {block} bytes")
    wrapped = M.start(mech, param, kek, "encrypt").crypt_once(value)
    return [out_buffer(args[4], wrapped)[1]]


def _secret_value(value: bytes, kt: int, tpl: Attrs, mech: int) -> bytes:
    n = tpl.get(O.CKA_VALUE_LEN)
    if isinstance(n, int) and mech in _BLOCK_ONLY and n <= len(value):
        value = value[:n]  # the block padding the wrapper added is cut by CKA_VALUE_LEN
    elif n is not None and n != len(value):
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN")
    if (kt == O.CKK_AES and len(value) not in (16, 24, 32)) or not 0 < len(value) <= SECRET_MAX:
        raise Pkcs11Error(ckr.WRAPPED_KEY_INVALID, "key length")
    return value


def _curve_params(key: M.PrivKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        for oid, curve in ecm.CURVES.items():
            if curve.name == key.curve.name:
                return oid
        raise Pkcs11Error(ckr.CURVE_NOT_SUPPORTED)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return bytes.fromhex("06032b6570")
    assert isinstance(key, ed448.Ed448PrivateKey)
    return bytes.fromhex("06032b6571")


def _private_kt(key: Any) -> int:
    if isinstance(key, rsa.RSAPrivateKey):
        return O.CKK_RSA
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return O.CKK_EC
    return M.CKK_EC_EDWARDS


async def unwrap_key(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    mech, param = mech_of(args[1])
    info = M.MECHANISMS.get(mech)
    if info is None or not info[2] & M.F_UNWRAP:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    _uk, kek = _wrapping_key(t, args[2], mech, O.CKA_UNWRAP, UNWRAPPING_KEY_HANDLE_INVALID,
                             ckr.UNWRAPPING_KEY_TYPE_INCONSISTENT, False)
    wrapped = args[3]
    if not isinstance(wrapped, bytes) or not wrapped:
        raise Pkcs11Error(ckr.WRAPPED_KEY_LEN_RANGE)
    tpl = O.parse_template(args[4] or [])
    cls, kt = tpl.get(O.CKA_CLASS), tpl.get(O.CKA_KEY_TYPE)
    if cls is None or kt is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_CLASS and CKA_KEY_TYPE")
    if cls not in (O.CKO_SECRET_KEY, O.CKO_PRIVATE_KEY):
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_CLASS")
    O.check_allowed(int(cls), tpl, so=t.login == SO)
    if O.CKA_VALUE in tpl:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_VALUE")
    try:
        clear = M.start(mech, param, kek, "decrypt").crypt_once(wrapped)
    except Pkcs11Error as e:
        if e.rv in (ckr.ENCRYPTED_DATA_INVALID, ckr.DATA_INVALID):
            raise Pkcs11Error(ckr.WRAPPED_KEY_INVALID) from None
        if e.rv in (ckr.ENCRYPTED_DATA_LEN_RANGE, ckr.DATA_LEN_RANGE):
            raise Pkcs11Error(ckr.WRAPPED_KEY_LEN_RANGE) from None
        raise
    attrs: Attrs = dict(tpl)
    if cls == O.CKO_SECRET_KEY:
        if kt not in _SECRET_TYPES:
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
        value = _secret_value(clear, int(kt), tpl, mech)
        attrs[O.CKA_VALUE_LEN] = len(value)
        full = O.with_defaults(O.CKO_SECRET_KEY, attrs)
    else:
        if mech not in _CARRY_PRIVATE:
            raise Pkcs11Error(ckr.WRAPPED_KEY_INVALID, "private keys: AES key wrap with padding")
        try:
            key = M.load_private(clear)
        except (ValueError, TypeError, Pkcs11Error):
            raise Pkcs11Error(ckr.WRAPPED_KEY_INVALID) from None
        if _private_kt(key) != kt:
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
        full = O.with_defaults(O.CKO_PRIVATE_KEY, attrs)
        add_public_parts(key, None, full, None if kt == O.CKK_RSA else _curve_params(key))
        value = M.private_der(key)
    full[O.CKA_ALWAYS_SENSITIVE] = full[O.CKA_NEVER_EXTRACTABLE] = 0
    return [await create_key_object(t, s, full, value)]


async def derive_key(t: SoftToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    mech, param = mech_of(args[1])
    info = M.MECHANISMS.get(mech)
    if info is None or not info[2] & M.F_DERIVE:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    base = t.obj(args[2], ckr.KEY_HANDLE_INVALID)
    if not base.flag(O.CKA_DERIVE):
        raise Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED)
    check_key(base, mech, None, True)
    tpl = O.parse_template(args[3] or [])
    if tpl.get(O.CKA_CLASS, O.CKO_SECRET_KEY) != O.CKO_SECRET_KEY:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_CLASS")
    tpl[O.CKA_CLASS] = O.CKO_SECRET_KEY
    O.check_allowed(O.CKO_SECRET_KEY, tpl, so=t.login == SO)
    kt = tpl.get(O.CKA_KEY_TYPE)
    if kt is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_KEY_TYPE")
    if kt not in _SECRET_TYPES or O.CKA_VALUE in tpl:
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_KEY_TYPE")
    key = crypto_key(t, base)
    n = tpl.get(O.CKA_VALUE_LEN)
    if n is None:
        if kt == O.CKK_AES:
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE_LEN")
        n = (key.curve.key_size + 7) // 8 if isinstance(key, ec.EllipticCurvePrivateKey) else 0
    n = int(n)
    if (kt == O.CKK_AES and n not in (16, 24, 32)) or not 0 < n <= SECRET_MAX:
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE if kt == O.CKK_AES
                          else ckr.ATTRIBUTE_VALUE_INVALID, "CKA_VALUE_LEN")
    value = ecm.ecdh_derive(key, param, n)
    attrs = O.with_defaults(O.CKO_SECRET_KEY, tpl | {O.CKA_VALUE_LEN: n})
    # a derived key is as sensitive and as unextracted as its base key has always been
    attrs[O.CKA_ALWAYS_SENSITIVE] = int(base.flag(O.CKA_ALWAYS_SENSITIVE)
                                        and bool(attrs[O.CKA_SENSITIVE]))
    attrs[O.CKA_NEVER_EXTRACTABLE] = int(base.flag(O.CKA_NEVER_EXTRACTABLE)
                                         and not attrs[O.CKA_EXTRACTABLE])
    return [await create_key_object(t, s, attrs, value)]

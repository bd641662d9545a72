"""Soft token objects: PKCS#11 constants, attribute rules and templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...codec import ckr
from ...errors import Pkcs11Error

# object classes, key types
CKO_DATA, CKO_CERTIFICATE, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY = 0, 1, 2, 3, 4
CKK_RSA, CKK_EC, CKK_GENERIC_SECRET, CKK_AES = 0x0, 0x3, 0x10, 0x1F
CKC_X_509 = 0

# attributes
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_APPLICATION, CKA_VALUE, CKA_OBJECT_ID = 0x10, 0x11, 0x12
CKA_CERTIFICATE_TYPE, CKA_ISSUER, CKA_SERIAL_NUMBER = 0x80, 0x81, 0x82
CKA_TRUSTED, CKA_CERTIFICATE_CATEGORY = 0x86, 0x87
CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE = 0x100, 0x101, 0x102, 0x103
CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP = 0x104, 0x105, 0x106, 0x107
CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER = 0x108, 0x109, 0x10A, 0x10B
CKA_DERIVE, CKA_START_DATE, CKA_END_DATE = 0x10C, 0x110, 0x111
CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT = 0x120, 0x121, 0x122
CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2 = 0x123, 0x124, 0x125
CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT = 0x126, 0x127, 0x128
CKA_VALUE_LEN, CKA_EXTRACTABLE, CKA_LOCAL = 0x161, 0x162, 0x163
CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_KEY_GEN_MECHANISM = 0x164, 0x165, 0x166
CKA_MODIFIABLE, CKA_COPYABLE, CKA_DESTROYABLE = 0x170, 0x171, 0x172
CKA_EC_PARAMS, CKA_EC_POINT = 0x180, 0x181
CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED = 0x202, 0x210
CK_UNAVAILABLE = 0xFFFFFFFFFFFFFFFF

BOOL_ATTRS = frozenset({
    CKA_TOKEN, CKA_PRIVATE, CKA_TRUSTED, CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP,
    CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_DERIVE,
    CKA_EXTRACTABLE, CKA_LOCAL, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_MODIFIABLE,
    CKA_COPYABLE, CKA_DESTROYABLE, CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED,
})
ULONG_ATTRS = frozenset({
    CKA_CLASS, CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY, CKA_KEY_TYPE, CKA_MODULUS_BITS,
    CKA_VALUE_LEN, CKA_KEY_GEN_MECHANISM,
})
#: values of private and secret keys: never readable, stored only encrypted
SENSITIVE_ATTRS = frozenset({
    CKA_VALUE, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1,
    CKA_EXPONENT_2, CKA_COEFFICIENT,
})
#: the attributes C_SetAttributeValue may change
SETTABLE = frozenset({CKA_LABEL, CKA_ID})
#: largest attribute value accepted (certificates included)
MAX_VALUE = 64 * 1024

_COMMON = {CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_COPYABLE,
           CKA_DESTROYABLE}
_KEY = _COMMON | {CKA_KEY_TYPE, CKA_ID, CKA_START_DATE, CKA_END_DATE, CKA_DERIVE, CKA_LOCAL,
                  CKA_KEY_GEN_MECHANISM, CKA_SUBJECT}
_PUB = _KEY | {CKA_ENCRYPT, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_WRAP, CKA_TRUSTED,
               CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EC_POINT}
_PRIV = _KEY | {CKA_SENSITIVE, CKA_DECRYPT, CKA_SIGN, CKA_SIGN_RECOVER, CKA_UNWRAP,
                CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
                CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED, CKA_MODULUS,
                CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS}
_SECRET = _KEY | {CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_VERIFY, CKA_WRAP,
                  CKA_UNWRAP, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
                  CKA_VALUE_LEN, CKA_TRUSTED, CKA_WRAP_WITH_TRUSTED, CKA_VALUE}
#: attributes a template may give, per class
ALLOWED: dict[int, frozenset[int]] = {
    CKO_DATA: frozenset(_COMMON | {CKA_APPLICATION, CKA_OBJECT_ID, CKA_VALUE}),
    CKO_CERTIFICATE: frozenset(_COMMON | {CKA_CERTIFICATE_TYPE, CKA_TRUSTED,
                                          CKA_CERTIFICATE_CATEGORY, CKA_SUBJECT, CKA_ID,
                                          CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_VALUE,
                                          CKA_START_DATE, CKA_END_DATE}),
    CKO_PUBLIC_KEY: frozenset(_PUB),
    CKO_PRIVATE_KEY: frozenset(_PRIV),
    CKO_SECRET_KEY: frozenset(_SECRET),
}
#: attributes only the token sets
_TOKEN_SET = frozenset({CKA_LOCAL, CKA_KEY_GEN_MECHANISM, CKA_ALWAYS_SENSITIVE,
                        CKA_NEVER_EXTRACTABLE, CKA_MODULUS_BITS})

Attrs = dict[int, int | bytes]


@dataclass(eq=False)
class SoftObject:
    handle: int
    attrs: Attrs
    #: the sealed key value (token objects) …
    sealed: bytes | None = None
    #: … or the key value in memory (session objects; token objects while logged in)
    value: bytes | None = None
    #: the session that made it (session objects), else None
    session: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> int:
        return int(self.attrs.get(CKA_CLASS, -1))

    @property
    def private(self) -> bool:
        return bool(self.attrs.get(CKA_PRIVATE, 0))

    @property
    def token(self) -> bool:
        return bool(self.attrs.get(CKA_TOKEN, 0))

    def flag(self, attr: int) -> bool:
        return bool(self.attrs.get(attr, 0))


def value_length(atype: int, value: int | bytes) -> int:
    if isinstance(value, int):
        return 1 if atype in BOOL_ATTRS else 8
    return len(value)


def parse_template(template: Any) -> Attrs:
    """Codec attributes → {type: int | bytes}; bad shapes give PKCS#11 errors."""
    if not isinstance(template, list | tuple):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "template")
    out: Attrs = {}
    for a in template:
        try:
            atype, value, length = a[0], a[1], a[2]
        except (TypeError, IndexError, KeyError):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "attribute") from None
        if not isinstance(atype, int):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "attribute type")
        if atype in out:
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, f"attribute {atype:#x} repeated")
        if length is None:
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, f"attribute {atype:#x} unavailable")
        if atype in BOOL_ATTRS or atype in ULONG_ATTRS:
            if not isinstance(value, int) or value < 0 or value >= 1 << 64:
                raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, f"attribute {atype:#x}")
            out[atype] = (1 if value else 0) if atype in BOOL_ATTRS else value
            continue
        if value is None:
            value = b""
        if not isinstance(value, bytes | bytearray):
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, f"attribute {atype:#x}")
        if len(value) > MAX_VALUE:
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, f"attribute {atype:#x} too long")
        out[atype] = bytes(value)
    return out


def check_allowed(cls: int, attrs: Attrs, generated: bool = False, so: bool = False) -> None:
    """``so``: the security officer is logged in (only it may make a trusted object)."""
    allowed = ALLOWED.get(cls)
    if allowed is None:
        raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "object class")
    for t in attrs:
        if t not in allowed:
            raise Pkcs11Error(ckr.ATTRIBUTE_TYPE_INVALID, f"attribute {t:#x}")
        if t in _TOKEN_SET and not generated:  # key generation sets them itself
            raise Pkcs11Error(ckr.ATTRIBUTE_READ_ONLY, f"attribute {t:#x}")
    if attrs.get(CKA_TRUSTED) and not so:
        # a trusted key may wrap CKA_WRAP_WITH_TRUSTED keys: a user's own key of a value
        # it chose would let those out (PKCS#11 2.40 4.8; SoftHSM refuses it so too)
        raise Pkcs11Error(ckr.ATTRIBUTE_READ_ONLY, "CKA_TRUSTED is set by the SO only")
    if cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY) and not attrs.get(CKA_SENSITIVE, 1):
        # key values are never readable here: refuse to promise otherwise
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_SENSITIVE must be true")


def with_defaults(cls: int, attrs: Attrs) -> Attrs:
    out: Attrs = {CKA_CLASS: cls, CKA_TOKEN: 0, CKA_MODIFIABLE: 1, CKA_COPYABLE: 0,
                  CKA_DESTROYABLE: 1, CKA_LABEL: b""}
    if cls == CKO_DATA:
        out |= {CKA_PRIVATE: 0, CKA_APPLICATION: b"", CKA_OBJECT_ID: b"", CKA_VALUE: b""}
    elif cls == CKO_CERTIFICATE:
        out |= {CKA_PRIVATE: 0, CKA_CERTIFICATE_TYPE: CKC_X_509, CKA_TRUSTED: 0,
                CKA_CERTIFICATE_CATEGORY: 0, CKA_ID: b"", CKA_ISSUER: b"",
                CKA_SERIAL_NUMBER: b"", CKA_SUBJECT: b""}
    else:
        out |= {CKA_ID: b"", CKA_DERIVE: 0, CKA_LOCAL: 0, CKA_START_DATE: b"",
                CKA_END_DATE: b"", CKA_SUBJECT: b"", CKA_KEY_GEN_MECHANISM: CK_UNAVAILABLE}
        if cls == CKO_PUBLIC_KEY:
            out |= {CKA_PRIVATE: 0, CKA_ENCRYPT: 0, CKA_VERIFY: 1, CKA_VERIFY_RECOVER: 0,
                    CKA_WRAP: 0, CKA_TRUSTED: 0}
        else:
            out |= {CKA_PRIVATE: 1, CKA_SENSITIVE: 1, CKA_DECRYPT: 0, CKA_SIGN: 1,
                    CKA_UNWRAP: 0, CKA_EXTRACTABLE: 0, CKA_WRAP_WITH_TRUSTED: 0}
            if cls == CKO_PRIVATE_KEY:
                out |= {CKA_SIGN_RECOVER: 0, CKA_ALWAYS_AUTHENTICATE: 0}
            else:
                out |= {CKA_ENCRYPT: 0, CKA_VERIFY: 0, CKA_WRAP: 0, CKA_TRUSTED: 0}
    out |= attrs
    if cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY):
        out[CKA_ALWAYS_SENSITIVE] = 1 if out.get(CKA_LOCAL) else 0
        out[CKA_NEVER_EXTRACTABLE] = 1 if out.get(CKA_LOCAL) and not out[CKA_EXTRACTABLE] else 0
    return out


def matches(obj: SoftObject, template: Attrs) -> bool:
    for t, v in template.items():
        if t in SENSITIVE_ATTRS and obj.cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY):
            return False
        if obj.attrs.get(t) != v:
            return False
    return True


def reply_attributes(obj: SoftObject, reqs: Any) -> tuple[list[Any], int]:
    """C_GetAttributeValue: (codec attributes, CK_RV in band)."""
    from ...codec.values import Attribute

    out: list[Any] = []
    sensitive = invalid = small = False
    secret_obj = obj.cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY)
    for r in reqs:
        try:
            atype, cap = int(r[0]), int(r[1])
        except (TypeError, IndexError, ValueError):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "attribute request") from None
        if secret_obj and atype in SENSITIVE_ATTRS:
            sensitive = True
            out.append(Attribute(atype, None, None))
            continue
        if atype not in obj.attrs:
            invalid = True
            out.append(Attribute(atype, None, None))
            continue
        value = obj.attrs[atype]
        n = value_length(atype, value)
        if cap == 0:
            out.append(Attribute(atype, None, n))
        elif cap < n:
            small = True
            out.append(Attribute(atype, None, None))
        else:
            out.append(Attribute(atype, value, n))
    rv = (ckr.ATTRIBUTE_SENSITIVE if sensitive else ckr.ATTRIBUTE_TYPE_INVALID if invalid
          else ckr.BUFFER_TOO_SMALL if small else ckr.OK)
    return out, rv

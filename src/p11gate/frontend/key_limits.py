"""Key-size limits: a client may not have a backend generate a key (or domain
parameters) larger than ``[[backend]] max_key_bits`` allows.

A generation cannot be interrupted once it is in the module, and its time grows
steeply with size (RSA-16384: many minutes; a 4096-bit DH safe prime: longer). So the
template is read here, before the backend is called, and a size beyond the limit is
refused at once with CKR_KEY_SIZE_RANGE. A size attribute whose value cannot be read
as a size, and explicit EC domain parameters that cannot be parsed, are refused with
CKR_TEMPLATE_INCONSISTENT (fail closed: the gateway cannot tell how big they are).
Anything the gateway does not size (an unknown named curve, a missing attribute) is
left to the module, which answers such templates quickly.

For a pool token the strictest limit of its members applies.
"""

from __future__ import annotations

import logging
from typing import Any

from ..backends.limits_config import KeyBitsConfig
from ..codec import Attribute, Mechanism, ckr
from ..codec import constants as ck
from ..codec.calls import CallId
from ..config import Config
from ..errors import Pkcs11Error
from .fair_share import member_backends
from .limits import refusal_log

log = logging.getLogger("p11gate.limits")

C_GenerateKey = CallId.C_GenerateKey
C_GenerateKeyPair = CallId.C_GenerateKeyPair
#: the calls checked here (template positions: C_GenerateKey 2; C_GenerateKeyPair 2, 3)
CHECKED_CALLS = frozenset({C_GenerateKey, C_GenerateKeyPair})

CKA_PRIME = ck.CKA_PRIME
CKA_MODULUS_BITS = ck.CKA_MODULUS_BITS
CKA_PRIME_BITS = ck.CKA_PRIME_BITS
CKA_VALUE_LEN = ck.CKA_VALUE_LEN
CKA_EC_PARAMS = ck.CKA_EC_PARAMS

CKM_RSA_PKCS_KEY_PAIR_GEN = ck.CKM_RSA_PKCS_KEY_PAIR_GEN
CKM_RSA_X9_31_KEY_PAIR_GEN = ck.CKM_RSA_X9_31_KEY_PAIR_GEN
CKM_DSA_KEY_PAIR_GEN = ck.CKM_DSA_KEY_PAIR_GEN
CKM_DH_PKCS_KEY_PAIR_GEN = ck.CKM_DH_PKCS_KEY_PAIR_GEN
CKM_X9_42_DH_KEY_PAIR_GEN = ck.CKM_X9_42_DH_KEY_PAIR_GEN
CKM_EC_KEY_PAIR_GEN = ck.CKM_EC_KEY_PAIR_GEN
CKM_EC_EDWARDS_KEY_PAIR_GEN = ck.CKM_EC_EDWARDS_KEY_PAIR_GEN
CKM_EC_MONTGOMERY_KEY_PAIR_GEN = ck.CKM_EC_MONTGOMERY_KEY_PAIR_GEN
CKM_DSA_PARAMETER_GEN = ck.CKM_DSA_PARAMETER_GEN
CKM_DH_PKCS_PARAMETER_GEN = ck.CKM_DH_PKCS_PARAMETER_GEN
CKM_X9_42_DH_PARAMETER_GEN = ck.CKM_X9_42_DH_PARAMETER_GEN
CKM_DSA_PROBABILISTIC_PARAMETER_GEN = ck.CKM_DSA_PROBABILISTIC_PARAMETER_GEN
CKM_DSA_SHAWE_TAYLOR_PARAMETER_GEN = ck.CKM_DSA_SHAWE_TAYLOR_PARAMETER_GEN

_RSA = frozenset({CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_X9_31_KEY_PAIR_GEN})
_EC = frozenset({CKM_EC_KEY_PAIR_GEN, CKM_EC_EDWARDS_KEY_PAIR_GEN,
                 CKM_EC_MONTGOMERY_KEY_PAIR_GEN})
_DH_KEYS = frozenset({CKM_DH_PKCS_KEY_PAIR_GEN, CKM_X9_42_DH_KEY_PAIR_GEN})
_DH_PARAMS = frozenset({CKM_DH_PKCS_PARAMETER_GEN, CKM_X9_42_DH_PARAMETER_GEN})
_DSA_PARAMS = frozenset({CKM_DSA_PARAMETER_GEN, CKM_DSA_PROBABILISTIC_PARAMETER_GEN,
                         CKM_DSA_SHAWE_TAYLOR_PARAMETER_GEN})

_BRAINPOOL = "1.3.36.3.3.2.8.1.1."
#: field size of named curves, by OID (CKA_EC_PARAMS holding a namedCurve)
CURVE_BITS: dict[str, int] = {
    "1.2.840.10045.3.1.1": 192, "1.3.132.0.33": 224, "1.2.840.10045.3.1.7": 256,
    "1.3.132.0.34": 384, "1.3.132.0.35": 521, "1.3.132.0.10": 256,
    "1.3.101.110": 255, "1.3.101.111": 448, "1.3.101.112": 255, "1.3.101.113": 448,
    **{_BRAINPOOL + str(i): bits
       for n, bits in enumerate((160, 192, 224, 256, 320, 384, 512))
       for i in (2 * n + 1, 2 * n + 2)},
}
#: curves named by a PrintableString (PKCS#11 3.0 Edwards/Montgomery curves)
CURVE_NAME_BITS = {b"edwards25519": 255, b"edwards448": 448,
                   b"curve25519": 255, b"curve448": 448}


def check_request(cfg: Config, served_name: str, call_id: int, args: list[Any],
                  who: str = "") -> None:
    """The frontend's entry: refuse a generation request beyond the limits of the
    backend (or pool) named ``served_name``."""
    if call_id not in CHECKED_CALLS:
        return
    try:
        check(limits_for(cfg, served_name), call_id, args)
    except Pkcs11Error as e:
        refusal_log.warning("key generation refused: beyond max_key_bits", who=who,
                            logger=log, backend=served_name, identity=who, rv=ckr.name(e.rv),
                            reason=str(e))
        raise


def limits_for(cfg: Config, served_name: str) -> KeyBitsConfig:
    """The limits of a backend, or the strictest of a pool's members."""
    confs = [b.max_key_bits for b in member_backends(cfg, served_name)]
    if len(confs) == 1:
        return confs[0]
    if not confs:
        return KeyBitsConfig()
    fields = KeyBitsConfig.model_fields
    return KeyBitsConfig(**{f: min(getattr(c, f) for c in confs) for f in fields})


def check(limits: KeyBitsConfig, call_id: int, args: list[Any]) -> None:
    """Raise Pkcs11Error if a C_GenerateKey/C_GenerateKeyPair request asks for more
    than ``limits`` allow; other calls pass."""
    if call_id not in CHECKED_CALLS:
        return
    mech = args[1]
    mtype = mech.type if isinstance(mech, Mechanism) else None
    templates: list[list[Attribute]] = [t for t in args[2:4] if isinstance(t, list)]
    if call_id == C_GenerateKey:
        template = templates[0] if templates else []
        _at_most(_ulong(template, CKA_VALUE_LEN), limits.secret // 8, "secret key bytes")
        if mtype in _DH_PARAMS:
            _at_most(_ulong(template, CKA_PRIME_BITS), limits.dh_parameters,
                     "DH parameter bits")
        elif mtype in _DSA_PARAMS:
            _at_most(_ulong(template, CKA_PRIME_BITS), limits.dsa, "DSA parameter bits")
        return
    for template in templates:  # public and private: either may carry the size
        if mtype in _RSA:
            _at_most(_ulong(template, CKA_MODULUS_BITS), limits.rsa, "RSA modulus bits")
        elif mtype in _EC:
            _at_most(_ec_bits(template), limits.ec, "EC field bits")
        elif mtype in _DH_KEYS:
            _at_most(_prime_bits(template), limits.dh, "DH prime bits")
        elif mtype == CKM_DSA_KEY_PAIR_GEN:
            _at_most(_prime_bits(template), limits.dsa, "DSA prime bits")


def _at_most(value: int | None, limit: int, what: str) -> None:
    if value is not None and value > limit:
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE, f"{what} {value} above the limit {limit}")


def _attr(template: list[Attribute], kind: int) -> Attribute | None:
    for a in template:
        if a.type == kind and a.length is not None:
            return a
    return None


def _ulong(template: list[Attribute], kind: int) -> int | None:
    a = _attr(template, kind)
    if a is None:
        return None
    v = a.value
    if isinstance(v, int):
        return v
    if isinstance(v, bytes | bytearray) and len(v) in (4, 8):
        return int.from_bytes(v, "little")  # a dialect that carries it as raw bytes
    raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, f"attribute {kind:#x} is not a size")


def _prime_bits(template: list[Attribute]) -> int | None:
    a = _attr(template, CKA_PRIME)
    if a is None or not isinstance(a.value, bytes | bytearray):
        return None
    return int.from_bytes(a.value, "big").bit_length()


def _ec_bits(template: list[Attribute]) -> int | None:
    a = _attr(template, CKA_EC_PARAMS)
    if a is None or not isinstance(a.value, bytes | bytearray) or not a.value:
        return None
    der = bytes(a.value)
    try:
        tag, body, rest = _tlv(der)
        if rest:
            raise ValueError("trailing bytes")
        if tag == 0x06:
            return CURVE_BITS.get(_oid(body))  # unknown curve: the module decides
        if tag == 0x13:
            return CURVE_NAME_BITS.get(body)
        if tag == 0x30:
            return _explicit_field_bits(body)
        if tag == 0x05:
            return None  # implicitlyCA: the module's own curve
    except ValueError:
        pass
    raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "CKA_EC_PARAMS cannot be read")


def _explicit_field_bits(seq: bytes) -> int:
    """SpecifiedECDomain (X9.62): SEQUENCE { version, fieldID SEQUENCE { fieldType,
    prime-p INTEGER | characteristic-two SEQUENCE { m INTEGER, … } }, … }."""
    tag, _, rest = _tlv(seq)
    if tag != 0x02:
        raise ValueError("no version")
    tag, field_id, _ = _tlv(rest)
    if tag != 0x30:
        raise ValueError("no fieldID")
    tag, _, params = _tlv(field_id)
    if tag != 0x06:
        raise ValueError("no fieldType")
    tag, value, _ = _tlv(params)
    if tag == 0x02:  # prime field: p
        return int.from_bytes(value, "big").bit_length()
    if tag == 0x30:  # characteristic two: m
        tag, m, _ = _tlv(value)
        if tag == 0x02 and len(m) <= 4:
            return int.from_bytes(m, "big")
    raise ValueError("unknown field")


def _tlv(data: bytes) -> tuple[int, bytes, bytes]:
    """One DER tag-length-value: (tag, value, what follows). Bounds-checked."""
    if len(data) < 2:
        raise ValueError("short")
    tag, n = data[0], data[1]
    pos = 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or len(data) < 2 + k:
            raise ValueError("bad length")
        n = int.from_bytes(data[2:2 + k], "big")
        pos += k
    if len(data) < pos + n:
        raise ValueError("truncated")
    return tag, data[pos:pos + n], data[pos + n:]


def _oid(body: bytes) -> str:
    if not body or len(body) > 64:
        raise ValueError("bad OID")
    arcs: list[int] = []
    v = 0
    for b in body:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(v)
            v = 0
    if v or not arcs:
        raise ValueError("bad OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))

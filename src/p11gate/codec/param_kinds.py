"""Which mechanism parameters may reach a module as the client's raw bytes.

A mechanism parameter is a C struct that the module reads through ``pParameter``. Where
the struct holds pointers (``CK_KEY_DERIVATION_STRING_DATA {pData, ulLen}``, CK_GCM_PARAMS,
...), raw bytes from a client would let the client choose what memory the module reads or
writes. So a parameter reaches a module only

* as a value a codec serializer decoded (the gateway then builds the struct and fills the
  pointers itself: :data:`mechanisms.SERIALIZERS`), or
* as raw bytes, when the PKCS#11 3.1 specification says the parameter holds no pointers
  (a CK_ULONG, an IV, a flat struct: the ``flat`` kind below; its length checked where it
  is fixed), or when it is a vendor mechanism (>= CKM_VENDOR_DEFINED) that the operator
  lists for that backend (``raw_parameter_mechanisms``), trusting the vendor's struct to
  be flat.

An empty or NULL parameter always passes: there is nothing for the module to misread
(the native layer hands the module a NULL pointer for it). Everything else is refused
with CKR_MECHANISM_PARAM_INVALID. The classification is a table built from the 3.1
headers and specification (:mod:`param_kinds_data`), never from "what has no serializer".
Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import NamedTuple

from . import constants as ck
from .calls import CALLS
from .param_kinds_data import MECHANISM_PARAMETERS

#: mechanisms whose raw parameter structure holds an object handle the gateway cannot
#: translate: refused rather than forwarded with a client's virtual handle
HANDLE_IN_RAW_PARAM = frozenset({ck.CKM_X9_42_DH_HYBRID_DERIVE, ck.CKM_X9_42_MQV_DERIVE,
                                 ck.CKM_CONCATENATE_BASE_AND_KEY, ck.CKM_ECMQV_DERIVE})

CKM_VENDOR_DEFINED = ck.CKM_VENDOR_DEFINED
#: the largest mechanism type a 32-bit wire field carries (0xFFFFFFFF is the NULL marker)
MAX_MECHANISM = 0xFFFFFFFE

#: kinds, by what the gateway may do with raw parameter bytes
NONE = "none"  # takes no parameter: only an empty one passes
FLAT = "flat"  # holds no pointers: raw bytes pass (of one of ``sizes`` when fixed)
POINTER = "pointer"  # holds pointers or object handles: only a serializer may build it
VENDOR = "vendor"  # vendor-defined: raw bytes pass only when the operator lists it
UNKNOWN = "unknown"  # not a mechanism of the 3.1 headers


class ParamKind(NamedTuple):
    kind: str
    #: FLAT: the allowed lengths in bytes (None: any length)
    sizes: frozenset[int] | None = None
    #: what the specification calls the parameter (for messages and the docs)
    what: str = ""


def _sizeof(fmt: str) -> int:
    """sizeof of a C struct laid out as the native ``struct`` format ``fmt``, including
    the trailing padding C adds up to the alignment of its widest member."""
    align = max((struct.calcsize(c) for c in fmt if c.isalpha() and c != "s"), default=1)
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(align, "B")
    return struct.calcsize(f"@{fmt}0{code}")


_ULONG = struct.calcsize("@L")


def _kind(spec: str) -> ParamKind:
    head, _, rest = spec.partition(":")
    if head == "none":
        return ParamKind(NONE, frozenset({0}), "no parameter")
    if head == "ulong":
        return ParamKind(FLAT, frozenset({_ULONG}), "CK_ULONG")
    if head == "bytes":
        if not rest:
            return ParamKind(FLAT, None, "a byte string")
        return ParamKind(FLAT, frozenset({int(rest)}), f"{rest} bytes")
    if head == "struct":
        name, _, fmt = rest.partition("=")
        return ParamKind(FLAT, frozenset({_sizeof(fmt)}), name)
    if head == "ptr":
        return ParamKind(POINTER, None, rest)
    if head == "handle":
        return ParamKind(POINTER, None, "CK_OBJECT_HANDLE")
    if head == "unverified":
        return ParamKind(POINTER, None, "a parameter the specification leaves open")
    if head == "vendor":
        return ParamKind(VENDOR, None, "vendor-defined")
    raise ValueError(f"unknown parameter kind {spec!r}")


#: mechanism type → kind of its parameter (PKCS#11 3.1; an alias shares its value)
KINDS: dict[int, ParamKind] = {}
#: mechanism type → its (first) name in the 3.1 headers, without CKM_
NAMES: dict[int, str] = {}
for _value, _name, _spec in MECHANISM_PARAMETERS:
    _k = _kind(_spec)
    if KINDS.setdefault(_value, _k) != _k:
        raise ValueError(f"CKM_{_name}: aliases disagree on the parameter")
    NAMES.setdefault(_value, _name)

#: the mechanisms whose raw parameter bytes may reach a module (the flat list)
FLAT_MECHANISMS: frozenset[int] = frozenset(t for t, k in KINDS.items() if k.kind == FLAT)


def kind_of(mtype: int) -> ParamKind:
    k = KINDS.get(mtype)
    if k is not None:
        return k
    if CKM_VENDOR_DEFINED <= mtype <= MAX_MECHANISM:
        return ParamKind(VENDOR, None, "vendor-defined")
    return ParamKind(UNKNOWN, None, "unknown mechanism")


def name_of(mtype: int) -> str:
    n = NAMES.get(mtype)
    return f"CKM_{n}" if n else f"mechanism {mtype:#x}"


def raw_parameter_refusal(
    mtype: int, length: int, vendor_raw: Collection[int] = ()
) -> str | None:
    """Why ``length`` raw parameter bytes for ``mtype`` must not reach a module, or None
    when they may. ``vendor_raw``: the vendor mechanisms the backend's operator trusts to
    take a flat parameter (values below CKM_VENDOR_DEFINED in it are ignored)."""
    if length == 0:
        return None
    k = kind_of(mtype)
    if k.kind == FLAT:
        if k.sizes is None or length in k.sizes:
            return None
        want = " or ".join(str(s) for s in sorted(k.sizes))
        return f"{name_of(mtype)} takes {k.what} ({want} bytes), not {length} bytes"
    if k.kind == VENDOR:
        if mtype >= CKM_VENDOR_DEFINED and mtype in vendor_raw:
            return None
        return (f"{name_of(mtype)}: raw parameter of a vendor mechanism not listed in the "
                "backend's raw_parameter_mechanisms")
    if k.kind == NONE:
        return f"{name_of(mtype)} takes no parameter"
    if k.kind == POINTER:
        return f"{name_of(mtype)} takes {k.what}, which the gateway cannot build from raw bytes"
    return f"{name_of(mtype)} is not a PKCS#11 3.1 mechanism; its parameter is unknown"


def check_vendor_list(values: Collection[int]) -> list[int]:
    """Validate an operator's raw_parameter_mechanisms; return them sorted. Raises
    ValueError naming the first bad value."""
    for v in values:
        if not CKM_VENDOR_DEFINED <= v <= MAX_MECHANISM:
            raise ValueError(
                f"{v:#x} is not a vendor mechanism: only values from CKM_VENDOR_DEFINED "
                "(0x80000000) to 0xfffffffe may be listed; standard mechanisms are "
                "classified by the gateway")
    return sorted(set(values))


#: PKCS#11 3.0 message-based calls (C_EncryptMessage, C_SignMessageBegin, ...): argument 1
#: is a per-message parameter whose struct depends on the mechanism of the Message*Init.
#: Every such struct of the 3.1 headers holds pointers (CK_GCM_MESSAGE_PARAMS,
#: CK_CCM_MESSAGE_PARAMS, CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS) and p11-kit carries it
#: as the client's raw bytes, for which the gateway has no serializer.
MESSAGE_PARAMETER_CALLS: frozenset[int] = frozenset(
    c.id for c in CALLS if "Message" in c.name and c.req_codes[1:2] == ("ay",))


def message_parameter_refusal(param: object) -> str | None:
    """Why a per-message parameter must not reach a module (any non-empty one), or None."""
    if isinstance(param, bytes | bytearray) and param:
        return ("a per-message parameter holds pointers the gateway cannot build from raw "
                "bytes")
    return None

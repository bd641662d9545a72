"""Attribute arrays: `aA` (with values) and `fA` (buffer sizes only), SPEC §5.

Value encodings are chosen by the attribute type through the dialect's table. Nesting of
templates is bounded (MAX_DEPTH) so a hostile frame cannot recurse without limit.
"""

from __future__ import annotations

import struct
from typing import Any

from . import ckr
from .buffer import MAX_ARRAY, Reader, Writer
from .errors import ArgumentError, ProtocolError
from .tables import AttrClass, Dialect
from .values import Attribute, AttrRequest, Null

#: native LP64 sizes used in the length field
ULONG_SIZE = 8
ATTRIBUTE_SIZE = 24
#: p11-kit ≥ 0.26.3 limits template nesting to 8 (CVE-2026-13757)
MAX_DEPTH = 8
#: more attributes than this in one array cannot be real; refuse before allocating
MAX_COUNT = 1 << 16


#: fast paths (see read_attr_requests, write_attribute): one struct per common shape
#: instead of a Reader/Writer call per field; anything else takes the general code
FAST_REQUESTS = 64
FAST_HEAD = 9  # bytes of an attribute's type, validity and length
_PAIRS = [struct.Struct(">" + "II" * n) for n in range(FAST_REQUESTS + 1)]
_ATTR_HEAD = struct.Struct(">IBI")  # type, valid, length
_HEAD_BYTE = struct.Struct(">IBIB")  # type, valid, length, CK_BBOOL value
_HEAD_ULONG = struct.Struct(">IBIQ")  # type, valid, length, CK_ULONG value
_HEAD_ARRAY = struct.Struct(">IBII")  # type, valid, length, byte-array length


def _count(r: Reader) -> int:
    n = r.u32()
    if n > MAX_COUNT or n > r.remaining():
        raise ProtocolError("attribute count out of range")  # not n: see framing
    return n


def read_attributes(
    r: Reader, d: Dialect, depth: int = 0, size_queries: list[bool] | None = None
) -> list[Attribute]:
    """Read an ``aA`` array. ``size_queries[i]`` tells that entry i answers a request with
    a NULL buffer (only the reply of C_GetAttributeValue has such entries)."""
    if depth > MAX_DEPTH:
        raise ArgumentError(ckr.DEVICE_ERROR, "attribute templates nested too deeply")
    n = _count(r)
    if size_queries is None or len(size_queries) != n:
        return [read_attribute(r, d, depth) for _ in range(n)]
    return [read_attribute(r, d, depth, size_queries[i]) for i in range(n)]


def read_attribute(
    r: Reader, d: Dialect, depth: int = 0, size_query: bool = False
) -> Attribute:
    if r.remaining() >= FAST_HEAD:  # type, validity and length in one unpack
        atype, valid, length = r.unpack(_ATTR_HEAD)
        if not valid:
            r.pos -= 4  # an unavailable entry has no length field
            return Attribute(atype, None, None)
    else:
        atype = r.u32()
        if r.byte() == 0:
            return Attribute(atype, None, None)
        length = r.u32()
    cls = d.attr_class(atype)
    value: Any
    if cls is AttrClass.BYTE:
        value = r.byte()
        decoded = 1
    elif cls is AttrClass.ULONG:
        value = r.u64()
        decoded = ULONG_SIZE
    elif cls is AttrClass.BYTE_ARRAY:
        value = r.array()
        decoded = 0 if value is None else len(value)
    elif cls is AttrClass.DATE:
        value = r.array()
        decoded = 0 if value is None else len(value)
        if decoded not in (0, 8):
            raise ArgumentError(ckr.DEVICE_ERROR, "CK_DATE must be 0 or 8 bytes")
    elif cls is AttrClass.MECHANISM_ARRAY:
        count = r.u32()
        if size_query:
            # p11-kit's server answers a size query with the count and no elements.
            value = Null(count)
            decoded = 0
        else:
            if count * ULONG_SIZE > r.remaining():
                raise ProtocolError("mechanism array count out of range")
            value = [r.u64() for _ in range(count)]
            decoded = count * ULONG_SIZE
    else:
        value = read_attributes(r, d, depth + 1)
        decoded = len(value) * ATTRIBUTE_SIZE
    if length < decoded:
        raise ArgumentError(ckr.DEVICE_ERROR, f"attribute {atype:#x} length below its value")
    return Attribute(atype, value, length)


def write_attributes(w: Writer, attrs: list[Attribute], d: Dialect) -> None:
    w.u32(len(attrs))
    for a in attrs:
        write_attribute(w, a, d)


def write_attribute(w: Writer, a: Attribute, d: Dialect) -> None:
    atype, value, length = a
    cls = d.attr_class(atype)
    if length is not None:
        # the common shapes in one pack; out-of-range or odd values take the general path
        vcls = value.__class__
        try:
            if cls is AttrClass.BYTE and (vcls is int or vcls is bool):
                w.buf += _HEAD_BYTE.pack(atype, 1, length, value & 0xFF)
                return
            if cls is AttrClass.ULONG and vcls is int:
                w.buf += _HEAD_ULONG.pack(atype, 1, length, value & 0xFFFFFFFFFFFFFFFF)
                return
            if cls is AttrClass.BYTE_ARRAY and vcls is bytes and len(value) < MAX_ARRAY:
                w.buf += _HEAD_ARRAY.pack(atype, 1, length, len(value))
                w.buf += value
                return
        except struct.error:
            pass
    w.u32(atype)
    if length is None:
        w.byte(0)
        return
    w.byte(1)
    w.u32(length)
    if cls is AttrClass.BYTE:
        w.byte(int(value or 0))
    elif cls is AttrClass.ULONG:
        w.u64(int(value or 0))
    elif cls is AttrClass.BYTE_ARRAY or cls is AttrClass.DATE:
        if value is not None and not isinstance(value, bytes | bytearray):
            raise ArgumentError(ckr.ATTRIBUTE_VALUE_INVALID, f"attribute {atype:#x} not bytes")
        w.array(None if value is None else bytes(value))
    elif cls is AttrClass.MECHANISM_ARRAY:
        # A NULL buffer is written as count 0: p11-kit's own server writes the count
        # without elements here, which its client cannot parse (SPEC §5.6).
        if isinstance(value, Null):
            w.u32(value.length)  # reproduce p11-kit's count-only form faithfully
            return
        mechs = value or []
        w.u32(len(mechs))
        for m in mechs:
            w.u64(m)
    else:
        write_attributes(w, value or [], d)


def read_attr_requests(r: Reader, d: Dialect, depth: int = 0) -> list[AttrRequest]:
    if depth > MAX_DEPTH:
        raise ArgumentError(ckr.DEVICE_ERROR, "attribute templates nested too deeply")
    n = _count(r)
    if n <= FAST_REQUESTS and r.remaining() >= 8 * n:
        start = r.pos
        flat = r.unpack(_PAIRS[n])
        types = flat[0::2]
        if not d.nested_fa or _array_types(d).isdisjoint(types):
            return list(map(AttrRequest, types, flat[1::2]))
        r.pos = start  # a nested fA body may follow an entry: the general path reads it
    out = []
    for _ in range(n):
        atype = r.u32()
        length = r.u32()
        nested = None
        if d.nested_fa and length and d.attr_class(atype) is AttrClass.ATTRIBUTE_ARRAY:
            nested = read_attr_requests(r, d, depth + 1)
            if length < len(nested) * ATTRIBUTE_SIZE:
                raise ArgumentError(ckr.DEVICE_ERROR, "nested template larger than buffer")
        out.append(AttrRequest(atype, length, nested))
    return out


_ARRAY_TYPES: dict[str, frozenset[int]] = {}


def _array_types(d: Dialect) -> frozenset[int]:
    """The attribute types of ``d`` whose fA entries may carry a nested fA body."""
    types = _ARRAY_TYPES.get(d.name)
    if types is None:
        types = frozenset(t for t, c in d.attr_classes.items() if c is AttrClass.ATTRIBUTE_ARRAY)
        _ARRAY_TYPES[d.name] = types
    return types


def write_attr_requests(w: Writer, reqs: list[AttrRequest], d: Dialect) -> None:
    w.u32(len(reqs))
    for atype, length, nested in reqs:
        w.u32(atype)
        w.u32(length)
        if d.nested_fa and length and d.attr_class(atype) is AttrClass.ATTRIBUTE_ARRAY:
            write_attr_requests(w, nested or [], d)

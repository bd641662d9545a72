"""Attribute arrays: `aA` (with values) and `fA` (buffer sizes only), SPEC §5.

Value encodings are chosen by the attribute type through the dialect's table. Nesting of
templates is bounded (MAX_DEPTH) so a hostile frame cannot recurse without limit.
"""

from __future__ import annotations

from typing import Any

from . import ckr
from .buffer import Reader, Writer
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


def _count(r: Reader) -> int:
    n = r.u32()
    if n > MAX_COUNT or n > r.remaining():
        raise ProtocolError(f"attribute count {n} out of range")
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
    w.u32(atype)
    if length is None:
        w.byte(0)
        return
    w.byte(1)
    w.u32(length)
    cls = d.attr_class(atype)
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


def write_attr_requests(w: Writer, reqs: list[AttrRequest], d: Dialect) -> None:
    w.u32(len(reqs))
    for atype, length, nested in reqs:
        w.u32(atype)
        w.u32(length)
        if d.nested_fa and length and d.attr_class(atype) is AttrClass.ATTRIBUTE_ARRAY:
            write_attr_requests(w, nested or [], d)

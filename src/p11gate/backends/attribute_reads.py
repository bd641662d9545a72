"""Reading one attribute whole, whatever its length.

A module answers "unavailable" both for an attribute an object lacks and for one longer
than the caller's buffer. Where an attribute is part of an object's identity (CKA_ID,
CKA_LABEL, CKA_UNIQUE_ID: ownership, re-finding a handle after a restart, pool
identities), taking the second for the first makes two objects one, so such a value is
asked for its size and read again at that size."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..codec import AttrRequest, ckr
from ..codec.calls import CallId
from ..errors import Pkcs11Error

Call = Callable[[int, list[Any]], Awaitable[list[Any]]]


async def read_whole(call: Call, session: int | None, handle: int, atype: int,
                     limit: int) -> bytes | None:
    """Attribute ``atype`` of object ``handle`` at its full length through ``call`` (a
    back end's or a pool member's), on ``session``; None when the object has none.
    Raises Pkcs11Error: CKR_DEVICE_MEMORY when it is longer than ``limit``,
    CKR_DEVICE_ERROR when it changed between the two reads, or the module's error."""
    (size,), _ = await call(CallId.C_GetAttributeValue,
                            [session, handle, [AttrRequest(atype, 0)]])
    if size.length is None:
        return None
    if size.length > limit:
        raise Pkcs11Error(ckr.DEVICE_MEMORY,
                          f"attribute {atype:#x} of {size.length} bytes: longer than "
                          f"{limit}")
    (attr,), _ = await call(CallId.C_GetAttributeValue,
                            [session, handle, [AttrRequest(atype, max(size.length, 1))]])
    if attr.length is None or not isinstance(attr.value, bytes | bytearray | None):
        raise Pkcs11Error(ckr.DEVICE_ERROR, f"attribute {atype:#x} changed while read")
    return bytes(attr.value or b"")

"""Pool object ids for what members return: a token object's id follows its identity
(class, CKA_ID, CKA_LABEL, or CKA_UNIQUE_ID), read from the member that returned the
handle; a session object's id names that one member's handle.

Why a module of its own: every call that makes or finds objects ends here, on the
general path and in finds alike, and the identity map must be kept right when a call
changes it (C_DestroyObject, a C_SetAttributeValue of an identity attribute).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...codec import AttrRequest
from ...codec import constants as ck
from ...codec.call_table import PLANS
from ..attribute_reads import read_whole
from .member import ID, Member
from .objects import Key, SessionObject, as_bytes

if TYPE_CHECKING:
    from .pool import PoolBackend

_IDENTITY_REQUEST = (ck.CKA_CLASS, ck.CKA_ID, ck.CKA_LABEL)
#: identity attributes that may be longer than the first read's buffer
_LONG_IDENTITY = frozenset((ck.CKA_ID, ck.CKA_LABEL, ck.CKA_UNIQUE_ID))
#: the longest CKA_ID, CKA_LABEL or CKA_UNIQUE_ID kept as a pool identity
IDENTITY_MAX = 64 * 1024


async def oid_for(pool: PoolBackend, m: Member, handle: int) -> int:
    """The pool's id of an object ``m`` just returned (found or created)."""
    oid = m.oids.get(handle)
    if oid is not None:
        return oid
    key = await read_key(pool, m, handle)
    if key is not None:
        oid = pool.objects.token_oid(key)
        m.handles[oid] = handle
        m.missing.pop(oid, None)
    else:
        oid = pool.objects.session_oid(SessionObject(m.index, m.epoch, handle))
    m.oids[handle] = oid
    return oid


async def after_call(pool: PoolBackend, m: Member, call_id: int, args: list[Any],
                     reply: list[Any]) -> list[Any]:
    """Give new objects pool ids; keep the identity map right after changes."""
    new = PLANS[call_id].new_objects
    if new and not (call_id == ID["C_DeriveKey2"] and len(reply) < 3):
        reply = list(reply)
        for p in new:
            reply[p] = await oid_for(pool, m, reply[p])
    elif call_id == ID["C_DestroyObject"]:
        oid = args[1]
        pool.objects.sessions.pop(oid, None)
        m.forget_handle(oid)
    elif call_id == ID["C_SetAttributeValue"]:
        oid = args[1]
        h = m.handles.get(oid)
        if h is not None and oid not in pool.objects.sessions and any(
            a.type in _IDENTITY_REQUEST for a in args[2]
        ):
            # the object's identity changed: the id follows the object
            key = await read_key(pool, m, h)
            if key is not None:
                pool.objects.rekey(oid, key)
            for other in pool.members:
                if other is not m:
                    other.forget_handle(oid)
    return reply


async def read_key(pool: PoolBackend, m: Member, handle: int) -> Key | None:
    """The identity of a token object (None for a session object)."""
    reqs = [AttrRequest(ck.CKA_TOKEN, 1), AttrRequest(ck.CKA_CLASS, 8),
            AttrRequest(ck.CKA_ID, 1024), AttrRequest(ck.CKA_LABEL, 1024)]
    if pool.cfg.identity == "unique-id":
        # a module without the attribute answers CKR_ATTRIBUTE_TYPE_INVALID for it
        # and still fills in the others
        reqs.append(AttrRequest(ck.CKA_UNIQUE_ID, 1024))
    attrs, _ = await m.call(ID["C_GetAttributeValue"], [m.control, handle, reqs])
    vals = {a.type: a.value for a in attrs if a.length is not None}
    for a in attrs:
        if a.length is None and a.type in _LONG_IDENTITY and vals.get(ck.CKA_TOKEN):
            # none, or longer than the buffer: read whole, or an identity without it
            # would be another object's (same class and CKA_ID, no label)
            whole = await read_whole(m.call, m.control, handle, a.type, IDENTITY_MAX)
            if whole is not None:
                vals[a.type] = whole
    if not vals.get(ck.CKA_TOKEN):
        return None
    cls = int(vals.get(ck.CKA_CLASS, 0))
    uid = vals.get(ck.CKA_UNIQUE_ID)
    if uid:
        return (cls, None, None, bytes(uid))
    return (cls, as_bytes(vals.get(ck.CKA_ID)), as_bytes(vals.get(ck.CKA_LABEL)), None)

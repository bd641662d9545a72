"""The object calls that differ on a layered token: changes and deletions check the
layer's grant, and a change to an object of a ``cow`` layer copies it first.

Refusals are CKR_ACTION_PROHIBITED throughout: the object exists and is readable, the
action on it is not allowed (as for CKA_MODIFIABLE/CKA_DESTROYABLE false, and as
C_CopyObject answers for CKA_COPYABLE false). CKR_TOKEN_WRITE_PROTECTED would claim
the whole token is read only, which is not true when layer 0 is writable.
"""

from __future__ import annotations

from typing import Any

from ...codec import ckr
from ...errors import Pkcs11Error
from . import objects as O
from . import ops
from .layers import COW, ROW_MASK, RW, LayeredToken
from .objects import SoftObject


def _access(t: LayeredToken, o: SoftObject) -> str:
    found = t.layer_of(o.handle)
    return RW if found is None else found[1]  # session objects are the caller's own


def may_copy(o: SoftObject) -> bool:
    """A cow copy is a new object in a file the identity controls: only for objects
    marked copyable, and never for a key whose value must stay where it is (the soft
    token's keys are always sensitive; an extractable one may move)."""
    if not o.flag(O.CKA_COPYABLE):
        return False
    if o.cls in (O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
        return o.flag(O.CKA_EXTRACTABLE) and not o.flag(O.CKA_NEVER_EXTRACTABLE)
    return True


def destroy_object(t: LayeredToken, args: list[Any]) -> list[Any]:
    t.session(args[0])
    o = t.obj(args[1])
    if _access(t, o) != RW:
        raise Pkcs11Error(ckr.ACTION_PROHIBITED, "object of a read-only layer")
    return ops.destroy_object(t, args)


def set_attribute_value(t: LayeredToken, args: list[Any]) -> list[Any]:
    s = t.session(args[0])
    o = t.obj(args[1])
    access = _access(t, o)
    if access == RW:
        return ops.set_attribute_value(t, args)
    O.parse_template(args[2])
    if access != COW or t.own is None:
        raise Pkcs11Error(ckr.ACTION_PROHIBITED, "object of a read-only layer")
    t.may_write(s, o.token, o.private)
    if not o.flag(O.CKA_MODIFIABLE) or not may_copy(o):
        raise Pkcs11Error(ckr.ACTION_PROHIBITED, "object may not be copied")
    found = t.layer_of(o.handle)
    assert found is not None
    value = t.key_value(o) if o.sealed is not None else None
    t.room(t.own, o.attrs, value)
    copy = t.own.add(dict(o.attrs), value, shadows=f"{found[0].name}:{o.handle & ROW_MASK}")
    try:
        return ops.set_attribute_value(t, [args[0], copy.handle, args[2]])
    except Pkcs11Error:
        t.own.delete(copy.handle & ROW_MASK)  # a refused change leaves no copy behind
        raise

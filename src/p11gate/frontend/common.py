"""Names the per-connection modules (connection, logins, objects) share."""

from __future__ import annotations

from ..codec import Attribute
from ..codec import constants as ck
from ..codec.calls import CallId
from .handles import ObjectRef

#: call name → call id
ID = CallId.__members__

#: how long a call that opens something new waits for a restarting backend, seconds
RESTART_WAIT = 10.0

PRIVATE_FALSE = Attribute(ck.CKA_PRIVATE, 0, 1)

#: (is token object, CKA_CLASS, CKA_ID, CKA_LABEL)
ObjectInfo = tuple[bool, int, bytes, bytes]


class Stale(Exception):
    """An object handle minted on an older backend instance; ``ref`` can be revived."""

    def __init__(self, ref: ObjectRef) -> None:
        super().__init__()
        self.ref = ref


def attr_bool(template: list[Attribute], kind: int) -> bool | None:
    for a in template:
        if a.type == kind and a.length is not None:
            return bool(a.value)
    return None


def attr_value(template: list[Attribute], kind: int, default: bytes) -> bytes:
    for a in template:
        if a.type == kind and a.length is not None and isinstance(a.value, bytes):
            return a.value
    return default

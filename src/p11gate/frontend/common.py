"""Names the per-connection modules (connection, logins, objects) share."""

from __future__ import annotations

from typing import Any

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


class KeyTypeUnknown(Exception):
    """A key's CKA_KEY_TYPE must be read (frontend/key_types.py) before its use."""

    def __init__(self, ref: ObjectRef) -> None:
        super().__init__()
        self.ref = ref
        #: as WrongKeyType.probe: for the module's own answer if the key is gone
        self.probe: tuple[list[Any], int] | None = None


class SlowPath(Exception):
    """A call the hot path (forwarding.forward_now) leaves to the async path."""


class WrongKeyType(Exception):
    """A key of another family than the mechanism's (frontend/key_types.py): ``rv``
    answers, unless the key may not do this at all (the module's first refusal)."""

    def __init__(self, ref: ObjectRef, rv: int, why: str) -> None:
        super().__init__(why)
        self.ref, self.rv, self.why = ref, rv, why
        #: (backend arguments with the client's mechanism, the key's position): for
        #: the probe of the module's own earlier refusal (key_types.refusal)
        self.probe: tuple[list[Any], int] | None = None


class EndsOperation(Exception):
    """A call refused by the gateway that, had the module refused it, would have ended
    its operation (PKCS#11 §5.2): the operation is ended on the module, then ``rv``
    answers (frontend/forwarding.py)."""

    def __init__(self, op: str, rv: int, why: str) -> None:
        super().__init__(why)
        self.op, self.rv, self.why = op, rv, why


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

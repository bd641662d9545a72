"""The one description of every RPC call: what each argument and reply position *means*.

``calls.py`` says how a call is encoded (its signature); this module says, per call id,
where its session, slot and object handles sit, which reply positions are new objects,
where its mechanism is, whether it is key use, and which phase of an operation it is.
Every table the frontend and the pool back end use is derived from here, and the
dispatcher reads one precompiled :class:`CallPlan` per call (``PLANS[call_id]``) instead
of looking a call id up in a dozen sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from . import ckr
from .calls import CALLS, Call, CallId

__all__ = ["PLANS", "CallId", "CallPlan", "Phase", "ids_where"]
from .constants import CKR_UNWRAPPING_KEY_HANDLE_INVALID


class Phase(Enum):
    """Where a call sits in a cryptographic operation."""

    NONE = "none"  #: not part of an operation
    INIT = "init"  #: starts one (C_SignInit, C_MessageSignInit, C_DigestInit)
    UPDATE = "update"  #: continues one (C_SignUpdate, C_DigestKey, dual updates)
    FINAL = "final"  #: ends a multi-part one (C_SignFinal, C_MessageSignFinal)
    ONE_SHOT = "one-shot"  #: single-part, ends it (C_Sign, C_SignRecover)
    MESSAGE = "message"  #: one message of a message-based operation (C_SignMessage…)


_ID = {c.name: c.id for c in CALLS}
_OPS = ("Encrypt", "Decrypt", "Digest", "Sign", "SignRecover", "Verify", "VerifyRecover")
_MESSAGE_VERBS = ("Encrypt", "Decrypt", "Sign", "Verify")
_DUAL = {"C_DigestEncryptUpdate": ("Digest", "Encrypt"),
         "C_DecryptDigestUpdate": ("Decrypt", "Digest"),
         "C_SignEncryptUpdate": ("Sign", "Encrypt"),
         "C_DecryptVerifyUpdate": ("Decrypt", "Verify")}
# Calls whose first argument is a slot id (PKCS#11: every one takes CK_SLOT_ID slotID)
_SLOT_FIRST = ("C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
               "C_InitToken", "C_OpenSession", "C_CloseAllSessions", "C_InitToken2")
#: the subset of those that only read what a slot is (answered from any one pool member)
_SLOT_QUERIES = ("C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList",
                 "C_GetMechanismInfo")
_KEY, _WRAPPING, _UNWRAPPING = (ckr.KEY_HANDLE_INVALID, ckr.WRAPPING_KEY_HANDLE_INVALID,
                                CKR_UNWRAPPING_KEY_HANDLE_INVALID)
# (object handle positions, the code an unknown handle gets at each: None = object call)
_OBJECTS: dict[str, tuple[tuple[int, ...], tuple[int | None, ...]]] = {
    "C_CopyObject": ((1,), (None,)),
    "C_DestroyObject": ((1,), (None,)),
    "C_GetObjectSize": ((1,), (None,)),
    "C_GetAttributeValue": ((1,), (None,)),
    "C_SetAttributeValue": ((1,), (None,)),
    "C_DigestKey": ((1,), (_KEY,)),
    "C_WrapKey": ((2, 3), (_WRAPPING, _KEY)),
    "C_UnwrapKey": ((2,), (_UNWRAPPING,)),
    "C_DeriveKey": ((2,), (_KEY,)),
    "C_DeriveKey2": ((2,), (_KEY,)),
    # session, saved state, encryption key, authentication key (0 = none)
    "C_SetOperationState": ((2, 3), (_KEY, _KEY)),
}
_NEW_OBJECTS = {"C_CreateObject": (0,), "C_CopyObject": (0,), "C_GenerateKey": (0,),
                "C_GenerateKeyPair": (0, 1), "C_UnwrapKey": (0,), "C_DeriveKey": (0,),
                "C_DeriveKey2": (2,)}
# request positions of the templates of calls that make objects
_CREATE_TEMPLATES = {"C_CreateObject": (1,), "C_CopyObject": (2,), "C_GenerateKey": (2,),
                     "C_GenerateKeyPair": (2, 3), "C_UnwrapKey": (4,), "C_DeriveKey": (3,),
                     "C_DeriveKey2": (3,)}
_KEY_USE_EXTRA = ("C_WrapKey", "C_UnwrapKey", "C_DeriveKey", "C_DeriveKey2", "C_DigestKey")
#: not served by pools: state that cannot move between members, or token-wide actions
_POOL_UNSUPPORTED = ("C_GetOperationState", "C_SetOperationState", "C_SessionCancel",
                     *_DUAL, "C_InitToken", "C_InitToken2", "C_WaitForSlotEvent")
#: creations a pool repeats on every member (same inputs, same object)
_DETERMINISTIC = ("C_CreateObject", "C_CopyObject", "C_UnwrapKey", "C_DeriveKey")
_GENERATED = ("C_GenerateKey", "C_GenerateKeyPair")
_OBJECT_WRITES = ("C_DestroyObject", "C_SetAttributeValue")


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What the dispatcher does with one call, compiled once from the table."""

    call: Call
    #: the first argument is a session handle / a slot id
    session: bool
    slot: bool
    #: request positions of object handles, and per position the code an unknown handle
    #: gets (None: CKR_OBJECT_HANDLE_INVALID; else a key's role, e.g. KEY_HANDLE_INVALID)
    object_args: tuple[int, ...]
    unknown_handle_codes: tuple[int | None, ...]
    #: a 0 object handle means "none" (CK_INVALID_HANDLE) and is passed as it is
    optional_objects: bool
    #: reply positions holding new object handles
    new_objects: tuple[int, ...]
    #: request position of the mechanism (always 1), None without one
    mechanism_arg: int | None
    #: uses the key at object_args[0]: policy "use", one audit record
    key_use: bool
    phase: Phase
    #: operations the call starts (INIT) or continues (the others); two for dual updates
    operations: tuple[str, ...]
    #: the operation a key given to this call is bound to (the *Init with a key, DigestKey)
    key_operation: str | None
    #: request positions of templates that create objects / of every ``aA`` template
    create_templates: tuple[int, ...]
    template_args: tuple[int, ...]
    #: (request position, item size) of output capacities (``fy`` 1, ``fu`` 8)
    capacity_args: tuple[tuple[int, int], ...]
    #: request position of an ``fA`` (C_GetAttributeValue), None otherwise
    attr_request_arg: int | None
    #: the reply has no handle and is encoded alike in every dialect: relay its bytes
    relayable: bool
    #: pool back end: answered from one member's slot / not served by pools
    slot_query: bool
    pool_unsupported: bool
    #: pool replication: "deterministic", "generated", "everywhere" or None
    replication: str | None


def _stem(name: str) -> str | None:
    """C_SignInit, C_Sign, C_SignUpdate and C_SignFinal are all "Sign"."""
    base = name.removeprefix("C_")
    for suffix in ("Init", "Update", "Final", ""):
        if suffix and not base.endswith(suffix):
            continue
        stem = base.removesuffix(suffix) if suffix else base
        if stem in _OPS:
            return stem
    return None


def _phase(c: Call) -> tuple[Phase, tuple[str, ...], str | None]:
    name = c.name
    for verb in _MESSAGE_VERBS:
        if name == f"C_Message{verb}Init":
            return Phase.INIT, (f"Message{verb}",), f"Message{verb}"
        if name == f"C_Message{verb}Final":
            return Phase.FINAL, (f"Message{verb}",), None
        if name in (f"C_{verb}Message", f"C_{verb}MessageBegin", f"C_{verb}MessageNext"):
            return Phase.MESSAGE, (f"Message{verb}",), None
    if name in _DUAL:
        return Phase.UPDATE, _DUAL[name], None
    if name == "C_DigestKey":
        return Phase.UPDATE, (), "Digest"
    op = _stem(name)
    if op is None:
        return Phase.NONE, (), None
    if name.endswith("Init"):
        return Phase.INIT, (op,), op if c.request == "uMu" else None
    if name.endswith("Update"):
        return Phase.UPDATE, (op,), None
    if name.endswith("Final"):
        return Phase.FINAL, (op,), None
    return Phase.ONE_SHOT, (op,), None


def _plan(c: Call) -> CallPlan:
    name, codes = c.name, c.req_codes
    objects, codes_unknown = _OBJECTS.get(name, ((), ()))
    if c.request == "uMu":  # every *Init with a key
        objects, codes_unknown = (2,), (_KEY,)
    slot = name in _SLOT_FIRST
    session = (codes[:1] == ("u",) and c.id >= _ID["C_OpenSession"] and not slot
               and name != "C_WaitForSlotEvent")
    phase, operations, key_operation = _phase(c)
    replication = ("deterministic" if name in _DETERMINISTIC else
                   "generated" if name in _GENERATED else
                   "everywhere" if name in _OBJECT_WRITES else None)
    new_objects = _NEW_OBJECTS.get(name, ())
    return CallPlan(
        call=c,
        session=session,
        slot=slot,
        object_args=objects,
        unknown_handle_codes=codes_unknown,
        optional_objects=name == "C_SetOperationState",
        new_objects=new_objects,
        mechanism_arg=1 if "M" in codes else None,
        key_use=c.request == "uMu" or name in _KEY_USE_EXTRA,
        phase=phase,
        operations=operations,
        key_operation=key_operation,
        create_templates=_CREATE_TEMPLATES.get(name, ()),
        template_args=tuple(i for i, code in enumerate(codes) if code == "aA"),
        capacity_args=tuple((i, 8 if code == "fu" else 1) for i, code in enumerate(codes)
                            if code in ("fy", "fu")),
        attr_request_arg=codes.index("fA") if "fA" in codes else None,
        relayable=c.rep_codes in ((), ("ay",)) and not new_objects,
        slot_query=name in _SLOT_QUERIES,
        pool_unsupported=name in _POOL_UNSUPPORTED,
        replication=replication,
    )


#: call id → its plan (a tuple: the dispatcher indexes it, no hashing)
PLANS: tuple[CallPlan, ...] = tuple(_plan(c) for c in CALLS)


def ids_where(predicate: object) -> frozenset[int]:
    """The call ids whose plan satisfies ``predicate`` (a ``CallPlan -> bool``)."""
    assert callable(predicate)
    return frozenset(p.call.id for p in PLANS if predicate(p))

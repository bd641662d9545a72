"""Operations that must not outlive the login they were started under, and templates
that must not say two things at once.

A find started while logged in lists private objects; a signature, decryption or key
digest started while logged in holds a private key. When the connection logs out (or
closes its last session on the token, which logs it out), each such operation on its
sessions is ended on the backend (the gateway calls its Final, or its single-part call,
with empty data and throws the result away) and *fenced*: until the client starts a new
operation of that kind, its continuation calls get CKR_OPERATION_NOT_INITIALIZED, so even
a module that did not end it cannot be driven any further.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from ..codec import Attribute, ckr
from ..codec import constants as ck
from ..errors import Pkcs11Error
from .common import ID
from .handles import settle
from .tables import OPERATION_OF_INIT, OPERATION_PHASES

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import ObjectRef, Session
    from .token import VirtualToken

#: output capacity for the calls that end a stale operation (the result is discarded)
_DRAIN_CAPACITY = 1 << 16

#: how to end each kind of operation: calls tried in order until one is not refused as
#: "not this phase" (a multi-part operation needs its Final, a single-part one its call)
_DRAIN: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = {
    "Encrypt": (("C_EncryptFinal", (_DRAIN_CAPACITY,)), ("C_Encrypt", (b"", _DRAIN_CAPACITY))),
    "Decrypt": (("C_DecryptFinal", (_DRAIN_CAPACITY,)), ("C_Decrypt", (b"", _DRAIN_CAPACITY))),
    "Digest": (("C_DigestFinal", (_DRAIN_CAPACITY,)),),
    "Sign": (("C_SignFinal", (_DRAIN_CAPACITY,)), ("C_Sign", (b"", _DRAIN_CAPACITY))),
    "SignRecover": (("C_SignRecover", (b"", _DRAIN_CAPACITY)),),
    "Verify": (("C_VerifyFinal", (b"",)), ("C_Verify", (b"", b""))),
    "VerifyRecover": (("C_VerifyRecover", (b"", _DRAIN_CAPACITY)),),
    "MessageEncrypt": (("C_MessageEncryptFinal", ()),),
    "MessageDecrypt": (("C_MessageDecryptFinal", ()),),
    "MessageSign": (("C_MessageSignFinal", ()),),
    "MessageVerify": (("C_MessageVerifyFinal", ()),),
}
#: answers that mean "this call does not end the operation in its current phase"
_WRONG_PHASE = {ckr.OPERATION_ACTIVE, ckr.OPERATION_NOT_INITIALIZED, ckr.BUFFER_TOO_SMALL,
                ckr.FUNCTION_NOT_SUPPORTED}


def duplicate_type(template: list[Attribute], depth: int = 0) -> int | None:
    """An attribute type named twice in ``template`` (or in a template nested in it),
    else None."""
    seen: set[int] = set()
    for a in template:
        if a.type in seen:
            return a.type
        seen.add(a.type)
        if isinstance(a.value, list) and a.value and isinstance(a.value[0], Attribute):
            inner = duplicate_type(a.value, depth + 1)
            if inner is not None:
                return inner
    return None


def unavailable_type(template: list[Attribute], depth: int = 0) -> int | None:
    """An attribute marked unavailable (no value, length (CK_ULONG)-1) in ``template``
    or in a template nested in it, else None: a request's template gives values."""
    for a in template:
        if a.length is None:
            return a.type
        if isinstance(a.value, list) and a.value and isinstance(a.value[0], Attribute):
            inner = unavailable_type(a.value, depth + 1)
            if inner is not None:
                return inner
    return None


#: what C_CreateObject must be given for a key of each (class, type): the attributes
#: PKCS#11 marks "must be specified when the object is created". SoftHSM answers a
#: template without one CKR_TEMPLATE_INCOMPLETE but keeps the object it began, which
#: C_FindObjects then lists; a verification with such an RSA public key (no
#: CKA_PUBLIC_EXPONENT) crashes it.
REQUIRED_FOR_CREATE: dict[tuple[int, int], tuple[int, ...]] = {
    (ck.CKO_PUBLIC_KEY, ck.CKK_RSA): (ck.CKA_MODULUS, ck.CKA_PUBLIC_EXPONENT),
    (ck.CKO_PRIVATE_KEY, ck.CKK_RSA): (ck.CKA_MODULUS, ck.CKA_PRIVATE_EXPONENT),
    (ck.CKO_PUBLIC_KEY, ck.CKK_EC): (ck.CKA_EC_PARAMS, ck.CKA_EC_POINT),
    (ck.CKO_PRIVATE_KEY, ck.CKK_EC): (ck.CKA_EC_PARAMS, ck.CKA_VALUE),
    (ck.CKO_SECRET_KEY, ck.CKK_AES): (ck.CKA_VALUE,),
    (ck.CKO_SECRET_KEY, ck.CKK_GENERIC_SECRET): (ck.CKA_VALUE,),
}


def incomplete_key(template: list[Attribute]) -> int | None:
    """A C_CreateObject template of a key (class and type given) without an attribute
    it must have (REQUIRED_FOR_CREATE): that attribute, else None."""
    values = {a.type: a.value for a in template}
    kind = (values.get(ck.CKA_CLASS), values.get(ck.CKA_KEY_TYPE))
    for t in REQUIRED_FOR_CREATE.get(kind, ()):  # type: ignore[arg-type]
        if t not in values:
            return t
    return None


def note_key_init(s: Session, call_id: int, ref: ObjectRef, logged_in: bool) -> None:
    """Remember an operation started with a key that may be private while logged in."""
    op = OPERATION_OF_INIT[call_id]
    s.auth_key = ref
    if logged_in and ref.private is not False:
        if s.private_ops is None:
            s.private_ops = set()
        s.private_ops.add(op)


def check_fence(s: Session, call_id: int) -> None:
    """Refuse continuing an operation that was ended at a logout."""
    fenced = s.fenced
    if not fenced:
        return
    ops = OPERATION_PHASES.get(call_id)
    if ops is not None and not fenced.isdisjoint(ops):
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED, "operation ended at logout")


#: inits without a key that start an operation of a kind a key joins later: a digest
#: is fenced for its C_DigestKey, and a new one starts with C_DigestInit
_KEYLESS_INITS: dict[int, str] = {ID["C_DigestInit"]: "Digest"}


def lift_fence(s: Session, call_id: int) -> None:
    """A new operation of a fenced kind started successfully (the module took its
    init, so the one ended at logout is over)."""
    if not s.fenced:
        return
    op = OPERATION_OF_INIT.get(call_id) or _KEYLESS_INITS.get(call_id)
    if op is not None:
        s.fenced.discard(op)


async def end_private_operations(c: ClientConnection, t: VirtualToken) -> None:
    """At logout: end this connection's finds and private-key operations on ``t``.
    Fenced first, at once (a continuation sent from now on is refused); each is ended
    on the backend only after the calls already sent on its session have ended: the
    module must not see an operation ended under a call still running in it."""
    todo: list[tuple[Session, asyncio.Future[None] | None, str | None, set[str]]] = []
    for s in list(c.handles.sessions.values()):
        if s.token is not t:
            continue
        mode, s.find = s.find, None
        ops, s.private_ops = s.private_ops, None
        if ops:
            if s.fenced is None:
                s.fenced = set()
            s.fenced |= ops
        todo.append((s, s.tail, mode, ops or set()))
    for s, tail, mode, ops in todo:
        await settle(s, tail)
        if s.generation != t.backend.generation:
            continue
        if mode == "backend":
            with contextlib.suppress(Pkcs11Error):
                await t.backend.call(ID["C_FindObjectsFinal"], [s.backend_handle])
        for op in ops:
            await _drain(t, s, op)


async def end_operation(s: Session, op: str) -> None:
    """End ``op`` on the backend session of ``s`` (its result thrown away)."""
    await _drain(s.token, s, op)


async def _drain(t: VirtualToken, s: Session, op: str) -> None:
    for name, rest in _DRAIN[op]:
        try:
            await t.backend.call(ID[name], [s.backend_handle, *rest])
        except Pkcs11Error as e:
            if e.rv in _WRONG_PHASE:
                continue
        return

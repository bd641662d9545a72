"""Handle translation for one connection: the client's virtual session and object
handles to the backend's and back, and what must be checked on the way (policy of key
use, fences, unknown-handle codes, mechanism parameters that carry handles, output
capacities, the creation rules of a public session)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ..audit import object_fields
from ..backends.attribute_reads import read_whole
from ..codec import (
    Attribute,
    AttrRequest,
    Call,
    Mechanism,
    ckr,
)
from ..codec import constants as ck
from ..codec.call_table import PLANS
from ..codec.param_kinds import (
    HANDLE_IN_RAW_PARAM,
    MESSAGE_PARAMETER_CALLS,
    message_parameter_refusal,
    raw_parameter_refusal,
)
from ..codec.values import HandleParam, KyberParams
from ..errors import Pkcs11Error
from . import key_types, precedence
from .common import ID, PRIVATE_FALSE, RESTART_WAIT, KeyTypeUnknown, Stale, WrongKeyType
from .handles import (
    IDENTITY_KNOWN,
    IDENTITY_NONE,
    IDENTITY_PENDING,
    IDENTITY_UNKNOWN,
    ObjectRef,
    Session,
)
from .operations import check_fence, note_key_init
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")

_DEFAULT_PRIVATE_CLASSES = {ck.CKO_PRIVATE_KEY, ck.CKO_SECRET_KEY}
#: creating these yields private/secret keys, which tokens make private by default
_KEY_MAKERS = {ID["C_GenerateKey"], ID["C_UnwrapKey"], ID["C_DeriveKey"], ID["C_DeriveKey2"]}


def requested_bytes(reqs: list[AttrRequest]) -> int:
    return sum(r.length + (requested_bytes(r.nested) if r.nested else 0) for r in reqs)


def session_for(c: ClientConnection, handle: int) -> Session:
    s = c.handles.sessions.get(handle)
    if s is None:
        raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
    if s.generation != s.token.backend.generation:
        # its backend instance died: the session went with it
        del c.handles.sessions[handle]
        raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
    return s


def object_for(c: ClientConnection, handle: int, token: VirtualToken) -> ObjectRef:
    ref = c.handles.objects.get(handle)
    if ref is None or ref.token is not token:
        raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
    if ref.private is not False and c.logging_out and token in c.logging_out:
        # a logout is dropping it: a private key used meanwhile (by a call on another
        # session) would start an operation that outlives the login
        raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
    if ref.generation != token.backend.generation:
        if ref.identity_state == IDENTITY_KNOWN:
            raise Stale(ref)  # a token object: find it again, keep the handle
        c.handles.drop_object(handle)
        raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
    return ref


def mint(c: ClientConnection, token: VirtualToken, backend_handle: int, generation: int,
          private: bool | None) -> int:
    h = c.handles.object_for(token, backend_handle, generation, private)
    ref = c.handles.objects[h]
    if ref.identity_state == IDENTITY_UNKNOWN:
        ref.identity_state = IDENTITY_PENDING
        t = asyncio.get_running_loop().create_task(capture_identity(c, ref))
        c.gw.background.add(t)
        t.add_done_callback(c.gw.background.discard)
    return h


async def capture_identity(c: ClientConnection, ref: ObjectRef) -> None:
    """Remember how to find a token object again (CKA_CLASS, CKA_ID, CKA_LABEL), so its
    handle survives a restart of the backend. Session objects die with the backend."""
    t = ref.token
    ref.identity_state = IDENTITY_NONE
    if ref.generation != t.backend.generation or t.control_session is None:
        return
    reqs = [AttrRequest(ck.CKA_TOKEN, 1), AttrRequest(ck.CKA_CLASS, 8),
            AttrRequest(ck.CKA_ID, 256), AttrRequest(ck.CKA_LABEL, 256)]
    try:
        attrs, _ = await t.backend.call(
            ID["C_GetAttributeValue"], [t.control_session, ref.backend_handle, reqs])
    except Pkcs11Error:
        return
    if not attrs or attrs[0].length is None or not attrs[0].value:
        return
    identity = []
    for a in attrs[1:]:
        if a.length is None and a.type != ck.CKA_CLASS:
            # no such attribute, or longer than the buffer: an identity without it would
            # find other objects too (after a restart, another tenant's with that
            # CKA_ID, this one destroyed meanwhile), so read it whole
            try:
                value = await read_whole(t.backend.call, t.control_session,
                                         ref.backend_handle, a.type,
                                         c.gw.cfg.server.max_buffer)
            except Pkcs11Error:
                return
            if value is None:
                continue  # the object has none
            a = Attribute(a.type, value, len(value))
        identity.append(a)
    ref.identity = identity
    ref.identity_state = IDENTITY_KNOWN


async def revive(c: ClientConnection, ref: ObjectRef) -> None:
    t = ref.token
    await t.backend.wait_up(RESTART_WAIT)
    await t.ensure()
    gen = t.backend.generation
    found: Any = []
    async with t.control_lock:
        try:
            await t.backend.call(ID["C_FindObjectsInit"], [t.control_session, ref.identity])
            (found,) = await t.backend.call(ID["C_FindObjects"], [t.control_session, 2])
        finally:
            with contextlib.suppress(Pkcs11Error):
                await t.backend.call(ID["C_FindObjectsFinal"], [t.control_session])
    if not isinstance(found, list) or len(found) != 1 or t.backend.generation != gen:
        c.handles.drop_object(ref.handle)
        raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
    c.handles.rebind(ref, found[0], gen)
    log.info("object handle rebound after backend restart",
             extra={"conn": c.id, "token": t.name, "handle": ref.handle})


def mechanism(c: ClientConnection, m: Mechanism | None, token: VirtualToken) -> Mechanism | None:
    if m is None:
        return m
    p = m.param
    if isinstance(p, HandleParam):
        try:
            ref = object_for(c, p.handle, token)
        except Pkcs11Error as e:  # the parameter's handle is a key's
            if e.rv == ckr.OBJECT_HANDLE_INVALID:
                raise Pkcs11Error(ckr.KEY_HANDLE_INVALID) from None
            raise
        return Mechanism(m.type, HandleParam(ref.backend_handle))
    if isinstance(p, KyberParams) and p.secret_handle:
        bh = object_for(c, p.secret_handle, token).backend_handle
        return Mechanism(m.type, p._replace(secret_handle=bh))
    if m.type in HANDLE_IN_RAW_PARAM and p is not None:
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "parameter carries a handle")
    if isinstance(p, bytes):  # no serializer built it: only a flat parameter passes
        why = raw_parameter_refusal(m.type, len(p), token.backend.raw_parameter_mechanisms)
        if why is not None:
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, why)
    return m


def prepare(c: ClientConnection, call: Call, args: list[Any], hot: bool = False
) -> tuple[Session, list[Any], list[bool | None]]:
    """Translate a session call's handles to the backend's (synchronously: nothing
    may await between the generation check and the send)."""
    plan = PLANS[call.id]
    s = session_for(c, args[0])
    token = s.token
    if plan.key_use:
        c.require(token, "use", "key use")
    if s.fenced:
        check_fence(s, call.id)
    bargs = list(args)
    bargs[0] = s.backend_handle
    key_ref: ObjectRef | None = None
    for pos, role in zip(plan.object_args, plan.unknown_handle_codes, strict=True):
        if bargs[pos] == 0 and plan.optional_objects:
            continue
        try:
            ref = object_for(c, bargs[pos], token)
        except Pkcs11Error as e:
            if e.rv == ckr.OBJECT_HANDLE_INVALID and role is not None:
                # the module's handle-independent refusal comes first (precedence.py)
                raise precedence.refusal(c, s, call.id, bargs, pos, role) from None
            raise
        bargs[pos] = ref.backend_handle
        if pos == plan.object_args[0]:
            key_ref = ref
            if plan.key_operation is not None:
                note_key_init(s, call.id, ref, token in c.logins)
    if plan.mechanism_arg is not None:
        m = bargs[1]
        bargs[1] = mechanism(c, m, token)
        if key_ref is not None and isinstance(m, Mechanism):
            try:
                key_types.check(s, call.id, m.type, key_ref, hot)  # before the module
            except (WrongKeyType, KeyTypeUnknown) as e:
                probe = list(bargs)
                probe[1] = m
                e.probe = (probe, plan.object_args[0])
                raise
    elif call.id in MESSAGE_PARAMETER_CALLS and message_parameter_refusal(bargs[1]):
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "per-message parameter")
    if s.raw_rsa is not None:
        key_types.check_data(s, call.id, bargs)
    if plan.capacity_args:
        bound_outputs(c, bargs, plan.capacity_args)
    elif plan.attr_request_arg is not None:
        bound_attr_requests(c, bargs[plan.attr_request_arg])
    private: list[bool | None] = []
    if plan.create_templates:
        private = creation_rules(c, call, bargs, plan.create_templates, token)
    return s, bargs, private


def bound_outputs(c: ClientConnection, bargs: list[Any], caps: tuple[tuple[int, int], ...]) -> None:
    """A client may announce any output capacity; the backend would allocate it.
    Clamp to max_buffer: a result that really is larger comes back as
    CKR_BUFFER_TOO_SMALL with its true size."""
    limit = c.gw.cfg.server.max_buffer
    for pos, item in caps:
        cap = bargs[pos]
        if cap * item > limit and cap != 0xFFFFFFFF:
            bargs[pos] = limit // item


def bound_attr_requests(c: ClientConnection, reqs: list[AttrRequest]) -> None:
    if requested_bytes(reqs) > c.gw.cfg.server.max_buffer:
        raise Pkcs11Error(ckr.HOST_MEMORY, "attribute buffers too large")


def finish(c: ClientConnection, call: Call, s: Session, private: list[bool | None], reply: list[Any]
) -> list[Any]:
    """Give new objects in a reply virtual handles."""
    new = PLANS[call.id].new_objects
    if new and not (call.id == ID["C_DeriveKey2"] and len(reply) < 3):
        for i, pos in enumerate(new):
            priv = private[min(i, len(private) - 1)] if private else None
            reply[pos] = mint(c, s.token, reply[pos], s.generation, priv)
    return reply


def creation_rules(
    c: ClientConnection, call: Call, bargs: list[Any], positions: tuple[int, ...],
    token: VirtualToken,
) -> list[bool | None]:
    """PKCS#11's rules for object creation in a public session, over a backend that
    may be logged in for another connection. Returns the known CKA_PRIVATE of each
    object to be created (None = token default)."""
    out: list[bool | None] = []
    public_session = not c.logged_in(token) and token.login.backend_logged_in
    for n, pos in enumerate(positions):
        template: list[Attribute] = bargs[pos]
        priv = next((bool(a.value) for a in template
                     if a.type == ck.CKA_PRIVATE and a.length is not None), None)
        if public_session:
            if priv:
                raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
            if priv is None:
                cls = next((a.value for a in template
                            if a.type == ck.CKA_CLASS and a.length is not None), None)
                private_kind = (
                    call.id in _KEY_MAKERS
                    or (call.id == ID["C_GenerateKeyPair"] and n == 1)
                    or cls in _DEFAULT_PRIVATE_CLASSES
                )
                if private_kind:
                    raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
                bargs[pos] = [*template, PRIVATE_FALSE]
                priv = False
        out.append(priv)
    return out


def object_fields_of(ref: ObjectRef) -> dict[str, Any]:
    if ref.identity is None:
        return {"handle": ref.handle}
    vals = {a.type: a.value for a in ref.identity}
    return object_fields(vals.get(ck.CKA_CLASS), vals.get(ck.CKA_ID),
                         vals.get(ck.CKA_LABEL))

"""Finding, creating, changing and destroying objects, under policy and namespaces.

Every object management call reads what the object is (token or session object, and
its identity: CKA_CLASS, CKA_ID, CKA_LABEL) so that policy can decide, namespaces can
hide what is not the tenant's, ownership can be recorded and the audit log can say
which object was touched.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ..audit import object_fields
from ..backends.attribute_reads import read_whole
from ..codec import Attribute, AttrRequest, Call, Mechanism, Null, ckr
from ..codec import constants as ck
from ..errors import Pkcs11Error
from ..state.base import StoreError as RegistryError
from . import key_limits, key_separation
from .common import ID, PRIVATE_FALSE, ObjectInfo, Stale, attr_bool, attr_value
from .handles import IDENTITY_KNOWN, IDENTITY_UNKNOWN, ObjectRef, Session
from .identity_checks import check_new_identity, check_unique
from .tables import CREATE_TEMPLATES, MECHANISM_CALLS, NEW_OBJECTS
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")


async def h_find_init(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    if s.find is not None:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    template: list[Attribute] = args[1]
    if not c.logged_in(s.token):
        # Always, not only while the backend is logged in: another connection may log
        # it in before this search is read, and some modules search lazily.
        wants_private = next((bool(a.value) for a in template
                              if a.type == ck.CKA_PRIVATE and a.length is not None), None)
        if wants_private:
            s.find = "empty"  # a public session finds no private objects
            return []
        if wants_private is None:
            args = [args[0], [*template, PRIVATE_FALSE]]
    await c.forward(call, args)
    s.find = "backend"
    return []


async def h_find(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    if s.find is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    if s.find == "empty":
        return [[] if args[1] else Null(0)]
    ns = c.grants[s.token].namespace
    if ns is not None and args[1]:
        return [await find_in_namespace(c, call, args, s)]
    (found,) = await c.forward(call, args)
    if isinstance(found, list):
        t = s.token
        private = False if not c.logged_in(t) else None
        if t.session_objects:
            # another application's session objects are not this one's business
            theirs = t.session_objects
            found = [h for h in found
                     if theirs.get((s.generation, h), c.id) == c.id]
        found = [c.mint(t, h, s.generation, private) for h in found]
    return [found]


async def find_in_namespace(
    c: ClientConnection, call: Call, args: list[Any], s: Session
) -> list[int]:
    """C_FindObjects for a tenant confined to a namespace: objects outside it do not
    exist for it. Filtering can empty a batch while more remain, so read on until
    something is visible or the backend has no more."""
    private = False if not c.logged_in(s.token) else None
    while True:
        (found,) = await c.forward(call, args)
        if not isinstance(found, list):
            return []
        out = []
        for bh in found:
            info = await read_info(c, s, bh)
            if info is not None and visible(c, s.token, s.generation, bh, info):
                h = c.mint(s.token, bh, s.generation, private)
                remember_identity(c, c.handles.objects[h], info)
                out.append(h)
        if out or len(found) < args[1]:
            return out


#: the buffer an identity attribute is read with first
_IDENTITY_READ = 1024


async def read_info(c: ClientConnection, s: Session, backend_handle: int) -> ObjectInfo | None:
    """(is token object, CKA_CLASS, CKA_ID, CKA_LABEL) of an object, read through the
    client's own backend session; None if the object cannot be read."""
    reqs = [AttrRequest(ck.CKA_TOKEN, 1), AttrRequest(ck.CKA_CLASS, 8),
            AttrRequest(ck.CKA_ID, _IDENTITY_READ), AttrRequest(ck.CKA_LABEL, _IDENTITY_READ)]
    try:
        attrs, _ = await s.token.backend.call(
            ID["C_GetAttributeValue"], [s.backend_handle, backend_handle, reqs])
        vals = {a.type: a.value for a in attrs if a.length is not None}
        if ck.CKA_TOKEN not in vals or ck.CKA_CLASS not in vals:
            return None
        for a in attrs[2:]:
            if a.length is None:
                # unavailable: no such attribute, or longer than the buffer (a module
                # answers both alike). Read as empty, a longer CKA_ID or CKA_LABEL was
                # another identity: the object of its owner, or one nobody owns
                # (an object without a label) taken over by making one with a long label
                vals[a.type] = await read_whole(
                    s.token.backend.call, s.backend_handle, backend_handle, a.type,
                    c.gw.cfg.server.max_buffer) or b""  # none, or sensitive: as before
    except Pkcs11Error:
        return None
    return (bool(vals[ck.CKA_TOKEN]), int(vals[ck.CKA_CLASS]),
            bytes(vals.get(ck.CKA_ID) or b""), bytes(vals.get(ck.CKA_LABEL) or b""))


def remember_identity(c: ClientConnection, ref: ObjectRef, info: ObjectInfo) -> None:
    if info[0] and ref.identity_state != IDENTITY_KNOWN:
        ref.identity = [Attribute(ck.CKA_CLASS, info[1], 8),
                        Attribute(ck.CKA_ID, info[2], len(info[2])),
                        Attribute(ck.CKA_LABEL, info[3], len(info[3]))]
        ref.identity_state = IDENTITY_KNOWN


def visible(
    c: ClientConnection, t: VirtualToken, generation: int, bh: int, info: ObjectInfo
) -> bool:
    ns = c.grants[t].namespace
    if ns is None:
        return True
    if not info[0]:
        return t.session_objects.get((generation, bh)) == c.id
    if ns.owned and c.gw.ownership.owner(t.name, info[1:]) == c.identity.key:
        return True
    return ns.prefix_match(info[2], info[3])


async def h_find_final(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    if s.find is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    mode, s.find = s.find, None
    if mode == "empty":
        return []
    return await c.forward(call, args)


async def target(
    c: ClientConnection, args: list[Any]
) -> tuple[Session, ObjectRef, ObjectInfo | None]:
    """The session and object of an object-management call, with what the backend
    says the object is (read before the change)."""
    for _ in range(4):
        s = c.session_for(args[0])
        try:
            ref = c.object_for(args[1], s.token)
            break
        except Stale as stale:
            await c.revive(stale.ref)
    else:
        raise Pkcs11Error(ckr.DEVICE_ERROR, "backend restarting repeatedly")
    return s, ref, await read_info(c, s, ref.backend_handle)


async def h_destroy(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s, ref, info = await target(c, args)
    t = s.token
    if info is None or info[0]:
        c.require(t, "destroy", "destroying a token object")
    fields = c.object_fields_of(ref) if info is None else object_fields(*info[1:])
    c.gw.audit.attempt(call.name, c.peer, t.name, object=fields)  # cannot be undone
    try:
        reply = await c.forward(call, args)
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, object=fields)
        raise
    c.handles.drop_object(args[1])
    if info is not None and info[0]:
        # released after the object is gone: if the registry cannot be written, what
        # remains is a claim on an identity that no object has (its owner may make it
        # again; no one else may), never an object on the token that no one owns
        release_ownership(c, t, info)
    t.session_objects.pop((ref.generation, ref.backend_handle), None)
    c.gw.limits.destroyed(c, ref, info)
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name, object=fields)
    return reply


async def h_set_attribute(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s, ref, info = await target(c, args)
    t = s.token
    if not c.logged_in(t) and t.login.backend_logged_in:
        for a in args[2]:
            if a.type == ck.CKA_PRIVATE and a.length is not None and a.value:
                raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
    if info is None or info[0]:
        c.require(t, "modify", "changing a token object")
    key_separation.check_templates(t, call.id, args, (2,))
    template: list[Attribute] = args[2]
    new_info = info
    if info is not None:
        new_id = attr_value(template, ck.CKA_ID, info[2])
        new_label = attr_value(template, ck.CKA_LABEL, info[3])
        new_info = (info[0], info[1], new_id, new_label)
        if info[0] and new_info[1:] != info[1:]:
            # a rename is a creation of the new identity: the same checks, before the
            # module sees it
            check_new_identity(c, t, new_info)
            await check_unique(c, s, new_info, already=0)
    fields = c.object_fields_of(ref) if info is None else object_fields(*info[1:])
    changed = [f"{a.type:#x}" for a in template]
    renamed = info is not None and new_info is not None and info[0] and new_info != info
    owner = c.gw.ownership.owner(t.name, info[1:]) if renamed and info else None
    c.gw.audit.attempt(call.name, c.peer, t.name, object=fields, attributes=changed)
    if owner is not None and new_info is not None:
        # the new identity is claimed before the object takes it (a registry that
        # cannot be written refuses the rename), the old one released after
        c.gw.ownership.claim(t.name, new_info[1:], owner)
    try:
        reply = await c.forward(call, args)
    except Pkcs11Error as e:
        if owner is not None and new_info is not None:
            release_ownership(c, t, new_info)
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, object=fields,
                                      attributes=changed)
        raise
    if renamed and info is not None and new_info is not None:
        if owner is not None:
            release_ownership(c, t, info)
        c.gw.limits.renamed(c, t, info, new_info)  # the object's quota count follows it
        ref.identity = None
        ref.identity_state = IDENTITY_UNKNOWN
        remember_identity(c, ref, new_info)
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name, object=fields,
                                  attributes=changed)
    return reply


def release_ownership(c: ClientConnection, t: VirtualToken, info: ObjectInfo) -> None:
    """Forget an identity's owner, where leaving the claim behind is the safe side: a
    registry write error is logged (by the registry) and goes no further."""
    if c.gw.ownership.owner(t.name, info[1:]) is None:
        return
    with contextlib.suppress(RegistryError):
        c.gw.ownership.release(t.name, info[1:])


# ------------------------------------------------------------ object creation


async def h_create(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    """C_CreateObject, C_CopyObject, C_GenerateKey(Pair), C_UnwrapKey, C_DeriveKey:
    policy first, then the call, then what was made: its identity is read back,
    checked against the tenant's namespace (undone if outside), recorded as owned
    and audited."""
    s = c.session_for(args[0])
    t = s.token
    token_objects = False
    for pos in CREATE_TEMPLATES[call.id]:
        on_token = attr_bool(args[pos], ck.CKA_TOKEN)
        # a copy keeps the original's CKA_TOKEN unless the template says otherwise
        if on_token or (on_token is None and call.id == ID["C_CopyObject"]):
            token_objects = True
    c.require(t, "create" if token_objects else "use",
                  "creating a token object" if token_objects else "creating an object")
    key_separation.check_templates(t, call.id, args, CREATE_TEMPLATES[call.id])
    c.gw.limits.check_create(c, t, call.id, args)  # object quotas: CKR_DEVICE_MEMORY
    for planned in planned_identities(call.id, args):
        # refused before the object exists even for a moment (checked again after)
        check_new_identity(c, t, planned)
        await check_unique(c, s, planned, already=0)
    mech = args[1] if call.id in MECHANISM_CALLS else None
    extra: dict[str, Any] = {}
    if isinstance(mech, Mechanism):
        extra["mechanism"] = f"{mech.type:#x}"
    try:
        key_limits.check_request(c.gw.cfg, t.backend.name, call.id, args, c.identity.key)
        reply = await c.forward(call, args)
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, **extra)
        raise
    new_positions = NEW_OBJECTS[call.id]
    if call.id == ID["C_DeriveKey2"] and len(reply) < 3:
        return reply
    made = [c.handles.objects[reply[p]] for p in new_positions]
    infos = [await read_info(c, s, ref.backend_handle) for ref in made]
    try:
        for info in infos:
            if info is None:
                continue
            if info[0]:
                check_new_identity(c, t, info)
                await check_unique(c, s, info)
    except Pkcs11Error:
        await undo_creation(c, s, made)
        raise
    ns = c.grants[t].namespace
    claimed: list[ObjectInfo] = []
    try:
        # fail closed: what cannot be recorded (ownership, then audit) is undone on
        # the backend, so the gateway never leaves an object it does not know
        for info in infos:
            if info is not None and info[0] and ns is not None and ns.owned:
                c.gw.ownership.claim(t.name, info[1:], c.identity.key)
                claimed.append(info)
        for ref, info in zip(made, infos, strict=True):
            what = ({"object": {"handle": ref.handle}} if info is None else
                    {"object": object_fields(*info[1:]), "token_object": info[0]})
            c.gw.audit.record(call.name, ckr.OK, c.peer, t.name, **what, **extra)
    except Pkcs11Error as e:
        await undo_creation(c, s, made)
        for info in claimed:
            release_ownership(c, t, info)
        log.error("creation undone: it could not be recorded", extra={
            "conn": c.id, "peer": c.peer, "token": t.name, "call": call.name,
            "rv": ckr.name(e.rv)})
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, undone=True, **extra)
        raise
    for ref, info in zip(made, infos, strict=True):
        if info is None:
            continue
        remember_identity(c, ref, info)
        key = (ref.generation, ref.backend_handle)
        if info[0]:
            t.session_objects.pop(key, None)
        else:
            t.session_objects[key] = c.id
        c.gw.limits.created(c, s.handle, ref, info)  # what counts against quotas
    return reply


#: the class an object made by each call has when its template does not say
_IMPLIED_CLASS: dict[int, tuple[int | None, ...]] = {
    ID["C_CreateObject"]: (None,),
    ID["C_GenerateKey"]: (ck.CKO_SECRET_KEY,),
    ID["C_GenerateKeyPair"]: (ck.CKO_PUBLIC_KEY, ck.CKO_PRIVATE_KEY),
    ID["C_UnwrapKey"]: (None,),
    ID["C_DeriveKey"]: (ck.CKO_SECRET_KEY,),
    ID["C_DeriveKey2"]: (ck.CKO_SECRET_KEY,),
}


def planned_identities(call_id: int, args: list[Any]) -> list[ObjectInfo]:
    """The identities of the token objects a creation will make, where its templates
    name them fully (class known, CKA_ID and CKA_LABEL given)."""
    out: list[ObjectInfo] = []
    for pos, implied in zip(CREATE_TEMPLATES[call_id], _IMPLIED_CLASS.get(call_id, ()),
                            strict=False):
        template: list[Attribute] = args[pos]
        if not attr_bool(template, ck.CKA_TOKEN):
            continue
        cls = next((a.value for a in template if a.type == ck.CKA_CLASS
                    and a.length is not None and isinstance(a.value, int)), implied)
        cka_id, label = (next((a.value for a in template if a.type == kind
                               and a.length is not None and isinstance(a.value, bytes)), None)
                         for kind in (ck.CKA_ID, ck.CKA_LABEL))
        if cls is not None and cka_id is not None and label is not None:
            out.append((True, cls, cka_id, label))
    return out


async def undo_creation(c: ClientConnection, s: Session, made: list[ObjectRef]) -> None:
    for ref in made:
        try:
            await s.token.backend.call(ID["C_DestroyObject"],
                                       [s.backend_handle, ref.backend_handle])
        except Pkcs11Error as e:
            # the one way left to an object the gateway does not know: say so loudly
            log.error("cannot undo a creation: object left on the token", extra={
                "conn": c.id, "token": s.token.name, "rv": ckr.name(e.rv),
                "object": c.object_fields_of(ref)})
        c.handles.drop_object(ref.handle)

"""The handlers of the calls a connection answers itself or routes by slot: initialize,
finalize, info, slot list, slot and token info, open/close sessions, session info."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..codec import (
    HANDSHAKE,
    Call,
    Null,
    Version,
    ckr,
)
from ..codec import constants as ck
from ..errors import BackendUnavailable, Pkcs11Error
from ..policy import Denied
from . import login_calls, translation
from .common import ID, RESTART_WAIT
from .handles import settle
from .token import VirtualToken, pad

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")



async def h_initialize(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    if args[0] != HANDSHAKE:
        raise Pkcs11Error(ckr.GENERAL_ERROR, "bad handshake")
    if c.initialized:
        raise Pkcs11Error(ckr.CRYPTOKI_ALREADY_INITIALIZED)
    c.initialized = True
    return []


async def h_finalize(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    # from here on only C_Initialize is served (the check in _run and _forward_now)
    c.initialized = False
    await c._cleanup()
    return []


async def h_get_info(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    return [
        Version(2, 40),
        pad("p11gate", 32),
        0,
        pad("p11gate PKCS#11 gateway", 32),
        Version(0, 1),
    ]


async def h_get_slot_list(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    # A token whose backend is restarting stays listed: calls that open something
    # wait for the restart, so a client never sees its slot vanish for a moment.
    capacity = args[1]
    slots = [t.slot_id for t in c.grants]
    if capacity < len(slots):
        return [Null(len(slots))]
    return [slots]


async def h_get_slot_info(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = c._token(args[0])
    flags = ck.CKF_REMOVABLE_DEVICE | ck.CKF_TOKEN_PRESENT
    return [pad(f"p11gate {t.name}", 64), pad("p11gate", 32), flags,
            Version(0, 1), Version(0, 1)]


async def h_get_token_info(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = await slot_token(c, args[0])
    info = await t.backend.call(call.id, [t.backend_slot])
    mine = [s for s in c.handles.sessions.values() if s.token is t]
    info[0] = t.label
    flags = info[4]
    if c.grants[t].write_protected:
        flags |= ck.CKF_WRITE_PROTECTED
    if t.pin_mode == "none":
        flags |= ck.CKF_PROTECTED_AUTHENTICATION_PATH
    info[4] = flags
    info[6] = len(mine)
    info[8] = sum(1 for s in mine if s.flags & ck.CKF_RW_SESSION)
    return info


async def h_slot_forward(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = await slot_token(c, args[0])
    return await t.backend.call(call.id, [t.backend_slot, *args[1:]])


async def h_open_session(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = await slot_token(c, args[0])
    flags = args[1]
    if not flags & ck.CKF_SERIAL_SESSION:
        raise Pkcs11Error(ckr.SESSION_PARALLEL_NOT_SUPPORTED)
    if not flags & ck.CKF_RW_SESSION and c.logins.get(t) == ck.CKU_SO:
        # PKCS#11 §5.6: no read-only session while the SO is logged in
        raise Pkcs11Error(ckr.SESSION_READ_WRITE_SO_EXISTS)
    if flags & ck.CKF_RW_SESSION and c.grants[t].write_protected:
        # PKCS#11: a read/write session on a write-protected token
        raise Denied(ckr.TOKEN_WRITE_PROTECTED, c.grants[t].rule,
                     "read/write session", t.name)
    with c.gw.limits.opening_session(c):  # CKR_SESSION_COUNT beyond quotas
        gen = t.backend.generation
        try:
            (bh,) = await t.backend.call(call.id, [t.backend_slot, flags])
        except BackendUnavailable:
            raise Pkcs11Error(ckr.DEVICE_ERROR) from None
        s = c.handles.add_session(t, bh, gen, flags)
    return [s.handle]


async def h_close_session(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = translation.session_for(c, args[0])
    del c.handles.sessions[s.handle]
    try:
        await s.token.backend.call(call.id, [s.backend_handle])
    except BackendUnavailable:
        pass
    await logout_if_last(c, s.token)
    return []


async def h_close_all_sessions(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = c._token(args[0])
    await close_sessions(c, t)
    await logout_if_last(c, t)
    return []


async def h_get_session_info(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = translation.session_for(c, args[0])
    rw = bool(s.flags & ck.CKF_RW_SESSION)
    user = c.logins.get(s.token)
    if user == ck.CKU_SO:
        state = ck.CKS_RW_SO_FUNCTIONS
    elif user == ck.CKU_USER:
        state = ck.CKS_RW_USER_FUNCTIONS if rw else ck.CKS_RO_USER_FUNCTIONS
    else:
        state = ck.CKS_RW_PUBLIC_SESSION if rw else ck.CKS_RO_PUBLIC_SESSION
    return [s.token.slot_id, state, s.flags & (ck.CKF_RW_SESSION | ck.CKF_SERIAL_SESSION), 0]


async def h_wait_for_slot_event(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    if args[0] & ck.CKF_DONT_BLOCK:
        raise Pkcs11Error(ckr.NO_EVENT)
    raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED)


async def slot_token(c: ClientConnection, slot_id: int) -> VirtualToken:
    t = c._token(slot_id)
    if not t.backend.up:
        await t.backend.wait_up(RESTART_WAIT)
    try:
        await t.ensure()
    except BackendUnavailable:
        raise Pkcs11Error(ckr.TOKEN_NOT_PRESENT) from None
    return t


async def logout_if_last(c: ClientConnection, t: VirtualToken) -> None:
    """PKCS#11: closing an application's last session with a token logs it out. Its
    handles to the token's objects end there too, as the module's own do (SoftHSM drops
    every object handle of a slot when its last session closes; PKCS#11 keeps a handle
    valid only while a session that used it exists): a handle kept through the gateway
    would answer where the module says CKR_OBJECT_HANDLE_INVALID."""
    if any(x.token is t for x in c.handles.sessions.values()):
        return
    if t in c.logins:
        await login_calls.logout(c, t)
    # checked again after the logout's awaits, and dropped without awaiting: no session
    # exists, so no call of this connection can be using (or minting) one of them
    if not any(x.token is t for x in c.handles.sessions.values()):
        for ref in c.handles.objects_of(t):
            c.handles.drop_object(ref.handle)


async def close_sessions(c: ClientConnection, t: VirtualToken) -> None:
    mine = [s for s in c.handles.sessions.values() if s.token is t]
    for s in mine:  # first out of the table: no call can be queued on them any more
        c.handles.sessions.pop(s.handle, None)
    for s in mine:
        await settle(s)
        if s.generation == t.backend.generation:
            try:
                await t.backend.call(ID["C_CloseSession"], [s.backend_handle])
            except Pkcs11Error:
                pass

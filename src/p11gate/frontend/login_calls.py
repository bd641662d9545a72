"""Login, logout and PINs for one connection, in every PIN mode.

``passthrough``: the first client login logs the backend in; later ones are checked
against a salted hash of the PIN that worked. ``mapped``/``none``: the gateway keeps the
backend logged in with its own credential and checks the identity (its own PIN, or
nothing). Wrong PINs are throttled per identity; every attempt is audited.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..audit import AuditError
from ..codec import AttrRequest, Call, ckr
from ..codec import constants as ck
from ..codec.calls import CALLS
from ..config import ConfigError
from ..errors import BackendUnavailable, Pkcs11Error
from ..policy import Denied
from .common import ID
from .limits import refusal_log
from .operations import end_private_operations
from .pins import hash_pin, verify_pin
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import Session


log = logging.getLogger("p11gate.conn")

#: checked against when an identity has no PIN, so that case takes as long as a wrong PIN
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


async def h_login(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    user_type = args[1]
    pin = args[2] if isinstance(args[2], bytes) else b""
    if call.id == ID["C_LoginUser"]:
        user_type, pin = args[1], (args[2] or b"") + b"\0" + (args[3] or b"")
    t = s.token
    if user_type == ck.CKU_CONTEXT_SPECIFIC:
        if not c.logged_in(t):
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        return await login_context(c, call, args, s, pin)
    if user_type not in (ck.CKU_SO, ck.CKU_USER):
        raise Pkcs11Error(ckr.USER_TYPE_INVALID)
    if user_type == ck.CKU_SO and not c.grants[t].may("so"):
        raise Denied(ckr.USER_TYPE_INVALID, c.grants[t].rule, "security officer login",
                     t.name)
    if t.gateway_login and user_type == ck.CKU_SO:
        # the gateway holds the backend's user login; SO functions need passthrough
        raise Pkcs11Error(ckr.USER_TYPE_INVALID, f"pin_mode {t.pin_mode}: no SO login")
    who = c.identity.key
    wait = await t.throttle.acquire(who)
    if wait > 0:
        _refuse_locked(c, call, t, user_type, wait)
    try:
        if t.gateway_login:
            await login_virtual(c, t, user_type, pin)
        else:
            await login_passthrough(c, call, args, t, user_type, pin)
    except Pkcs11Error as e:
        if e.rv in _WRONG_PIN:
            t.throttle.failed(who)
        else:
            t.throttle.abandoned(who)
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, user_type=user_type)
        raise
    except BaseException:
        t.throttle.abandoned(who)
        raise
    t.throttle.succeeded(who)
    try:
        c.gw.audit.record(call.name, ckr.OK, c.peer, t.name, user_type=user_type)
    except AuditError:
        # fail closed: a login nobody can trace is not granted (the backend login of a
        # passthrough token is undone unless another connection holds it)
        await logout(c, t)
        raise
    log.info("login", extra={"conn": c.id, "token": t.name, "user_type": user_type})
    return []


_WRONG_PIN = (ckr.PIN_INCORRECT, ckr.PIN_INVALID, ckr.PIN_LEN_RANGE)


async def _reauth_pending(s: Session) -> bool:
    """Whether the session's last operation with a key may wait for a
    CKU_CONTEXT_SPECIFIC login (its key has CKA_ALWAYS_AUTHENTICATE; when in doubt,
    yes)."""
    ref = s.auth_key
    if ref is None or ref.generation != s.token.backend.generation:
        return False
    try:
        attrs, rv = await s.token.backend.call(
            ID["C_GetAttributeValue"],
            [s.backend_handle, ref.backend_handle, [AttrRequest(ck.CKA_ALWAYS_AUTHENTICATE, 1)]])
    except Pkcs11Error:
        return True
    return rv != ckr.OK or bool(attrs[0].value)


async def login_context(c: ClientConnection, call: Call, args: list[Any], s: Session,
                        pin: bytes) -> list[Any]:
    """CKU_CONTEXT_SPECIFIC (a key with CKA_ALWAYS_AUTHENTICATE): the connection proves
    again what its login proved (its own PIN on a mapped token; the PIN that logged the
    backend in on a passthrough one; nothing with pin_mode none) and the module gets the
    credential the gateway holds. A wrong PIN never reaches the module and is counted
    like any other: the backend PIN of a mapped token stays out of a client's reach (it
    was an oracle for it, unthrottled), and so does the device's own retry counter."""
    t = s.token
    who = c.identity.key
    wait = await t.throttle.acquire(who)
    if wait > 0:
        _refuse_locked(c, call, t, ck.CKU_CONTEXT_SPECIFIC, wait)
    try:
        if t.mapped_pins is not None:
            stored = t.mapped_pins.get(who)
            right = await asyncio.to_thread(verify_pin, pin, stored or _DUMMY_HASH)
            right = right and stored is not None
        elif t.gateway_login:
            right = True
        else:
            right = await asyncio.to_thread(t.login.verify, pin)
        if not right:
            # as the module answers when no operation waits for a re-authentication
            raise Pkcs11Error(ckr.PIN_INCORRECT if await _reauth_pending(s)
                              else ckr.OPERATION_NOT_INITIALIZED)
        if t.gateway_login:
            try:
                secret = t.cfg.backend_pin()
            except (ConfigError, OSError) as e:
                raise Pkcs11Error(ckr.GENERAL_ERROR, f"token {t.name}: {e}") from None
            reply = await c.forward(CALLS[ID["C_Login"]],
                                    [args[0], ck.CKU_CONTEXT_SPECIFIC, secret])
            del secret
        else:
            reply = await c.forward(call, args)
    except Pkcs11Error as e:
        (t.throttle.failed if e.rv in _WRONG_PIN else t.throttle.abandoned)(who)
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name,
                                      user_type=ck.CKU_CONTEXT_SPECIFIC)
        raise
    except BaseException:
        t.throttle.abandoned(who)
        raise
    t.throttle.succeeded(who)
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name,
                                  user_type=ck.CKU_CONTEXT_SPECIFIC)
    return reply


#: per-token key of the attempts that reach the backend unverified (passthrough, nobody
#: logged in): every identity's wrong PINs count against the device's own retry counter
_BACKEND = "\0backend:"


def _refuse_locked(c: ClientConnection, call: Call, t: VirtualToken, user_type: int,
                   wait: float, backend: bool = False) -> None:
    refusal_log.warning("login refused: too many wrong PINs", who=c.identity.key, conn=c.id,
                        peer=c.peer, token=t.name, retry_in_s=round(wait, 1),
                        scope="token (backend PIN attempts)" if backend else "identity")
    c.gw.audit.record_best_effort(call.name, ckr.PIN_LOCKED, c.peer, t.name,
                                  user_type=user_type, throttled=True)
    raise Pkcs11Error(ckr.PIN_LOCKED)


async def login_virtual(c: ClientConnection, t: VirtualToken, user_type: int, pin: bytes) -> None:
    """mapped/none: the backend is logged in by the gateway; check this identity."""
    if t in c.logins:
        raise Pkcs11Error(ckr.USER_ALREADY_LOGGED_IN)
    await t.ensure()
    if t.mapped_pins is not None:
        stored = t.mapped_pins.get(c.identity.key)
        if stored is None:
            # no PIN for this identity: as good as a wrong one (and as slow)
            await asyncio.to_thread(verify_pin, pin, _DUMMY_HASH)
            raise Pkcs11Error(ckr.PIN_INCORRECT)
        if not await asyncio.to_thread(verify_pin, pin, stored):
            log.info("login refused", extra={"conn": c.id, "token": t.name,
                                             "rv": "CKR_PIN_INCORRECT"})
            raise Pkcs11Error(ckr.PIN_INCORRECT)
    t.login.holders.add(c.id)
    c.logins[t] = user_type


async def login_passthrough(c: ClientConnection, call: Call, args: list[Any], t: VirtualToken,
                             user_type: int, pin: bytes) -> None:
    async with t.login_lock:
        st = t.login
        if user_type == ck.CKU_SO and any(
            not x.flags & ck.CKF_RW_SESSION for x in c.handles.sessions.values()
            if x.token is t
        ):
            # before the login state, as the module checks it (SoftHSM: a read-only
            # session refuses an SO login whoever is logged in)
            raise Pkcs11Error(ckr.SESSION_READ_ONLY_EXISTS)
        if t in c.logins:
            same = c.logins[t] == user_type
            raise Pkcs11Error(ckr.USER_ALREADY_LOGGED_IN if same
                              else ckr.USER_ANOTHER_ALREADY_LOGGED_IN)
        if st.user_type is not None:
            if st.user_type != user_type:
                raise Pkcs11Error(ckr.USER_ANOTHER_ALREADY_LOGGED_IN)
            if not await asyncio.to_thread(st.verify, pin):
                log.info("login refused", extra={"conn": c.id, "token": t.name,
                                                 "rv": "CKR_PIN_INCORRECT"})
                raise Pkcs11Error(ckr.PIN_INCORRECT)
        else:
            await t.ensure()
            # The PIN goes to the device unverified: one at a time per token (the lock),
            # and no more wrong ones in a row, from all identities together, than the
            # token's max_pin_failures, so clients cannot trip the device's own counter.
            key = f"{_BACKEND}{user_type}"
            wait = t.throttle.begin(key)
            if wait > 0:
                _refuse_locked(c, call, t, user_type, wait, backend=True)
            bargs = [t.control_session, *args[1:]]
            try:
                await t.backend.call(call.id, bargs)
            except BackendUnavailable:
                t.throttle.abandoned(key)
                raise Pkcs11Error(ckr.DEVICE_ERROR) from None
            except Pkcs11Error as e:
                (t.throttle.failed if e.rv in _WRONG_PIN else t.throttle.abandoned)(key)
                raise
            except BaseException:
                t.throttle.abandoned(key)
                raise
            t.throttle.succeeded(key)
            await asyncio.to_thread(st.set, user_type, pin)
        st.holders.add(c.id)
        c.logins[t] = user_type


async def h_logout(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    if s.token not in c.logins:
        raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
    await logout(c, s.token)
    return []


async def logout(c: ClientConnection, t: VirtualToken, closing: bool = False) -> None:
    """Drop this connection's login on ``t``: first its finds and private-key
    operations and its handles to private objects (while the backend can still tell
    which are private), then the backend login if no other connection holds it.
    ``closing``: the connection's sessions are about to be closed anyway."""
    c.logins.pop(t, None)
    c.logging_out.add(t)  # before any await: see translation.object_for
    try:
        if not closing:
            await end_private_operations(c, t)
        await drop_private_handles(c, t)
    finally:
        c.logging_out.discard(t)
    async with t.login_lock:
        st = t.login
        st.holders.discard(c.id)
        if not st.holders and st.user_type is not None and not t.gateway_login:
            st.clear()
            if t.control_session is not None and t.backend.up:
                try:
                    await t.backend.call(ID["C_Logout"], [t.control_session])
                except Pkcs11Error:
                    pass
    log.info("logout", extra={"conn": c.id, "token": t.name})


async def drop_private_handles(c: ClientConnection, t: VirtualToken) -> None:
    unknown = [r for r in c.handles.objects_of(t) if r.private is not False]
    for ref in unknown:
        private = ref.private
        if private is None and ref.generation == t.backend.generation and t.backend.up:
            try:
                (attrs, rv) = await t.backend.call(
                    ID["C_GetAttributeValue"],
                    [t.control_session, ref.backend_handle, [AttrRequest(ck.CKA_PRIVATE, 1)]],
                )
                private = rv != ckr.OK or bool(attrs[0].value)
            except Pkcs11Error:
                private = True
        if private is not False:
            c.handles.drop_object(ref.handle)
        else:
            ref.private = False


async def h_set_pin(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    t = s.token
    old = args[1] if isinstance(args[1], bytes) else b""
    new = args[2] if isinstance(args[2], bytes) else b""
    if t.mapped_pins is not None:
        # mapped: an identity changes its own PIN; the backend's is untouched
        if t not in c.logins:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        if not 4 <= len(new) <= 255:
            raise Pkcs11Error(ckr.PIN_LEN_RANGE)
        stored = t.mapped_pins.get(c.identity.key)
        if stored is None or not await asyncio.to_thread(verify_pin, old, stored):
            t.throttle.failed(c.identity.key)
            c.gw.audit.record_best_effort(call.name, ckr.PIN_INCORRECT, c.peer, t.name)
            raise Pkcs11Error(ckr.PIN_INCORRECT)
        new_hash = await asyncio.to_thread(hash_pin, new)
        c.gw.audit.attempt(call.name, c.peer, t.name)
        try:
            # the registry first: if it cannot be written the PIN stays as it was
            t.mapped_pins.set(c.identity.key, new_hash)
        except Pkcs11Error as e:
            c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name)
            raise
        c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name)
        return []
    if t.gateway_login:
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "pin_mode none has no PIN")
    # passthrough: this changes the backend's PIN, shared by every client
    c.require(t, "so", "C_SetPIN of the shared backend PIN")
    c.gw.audit.attempt(call.name, c.peer, t.name)  # cannot be undone: audited before
    try:
        reply = await c.forward(call, args)
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name)
        raise
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name)
    if t in c.logins and new:
        await asyncio.to_thread(t.login.change_pin, new)
    return reply


async def h_init_pin(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    s = c.session_for(args[0])
    c.require(s.token, "so", "C_InitPIN")
    c.gw.audit.attempt(call.name, c.peer, s.token.name)  # cannot be undone: audited before
    try:
        reply = await c.forward(call, args)
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, s.token.name)
        raise
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, s.token.name)
    return reply

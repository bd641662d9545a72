"""C_InitToken through the gateway.

A module refuses C_InitToken (CKR_SESSION_EXISTS) while any session is open on the
token, and the gateway always holds one: the control session of each virtual token
served by that backend token. So, for an SO whom policy grants ``so``, and only when no
client connection has a session on the token, the gateway closes its own sessions on it,
runs C_InitToken, and opens them again. The token's objects are gone for everyone, as on
the module: every connection's handles to them are dropped.

Refused with CKR_FUNCTION_NOT_SUPPORTED:

* pool tokens: initializing one member would make it differ from the others, and
  initializing all of them is not one atomic act (a failure half-way leaves a pool
  whose members hold different objects and PINs);
* ``pin_mode`` mapped/none: the gateway logs the backend in with a stored user PIN that
  a fresh token does not have, and SO functions need passthrough.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..backends.pool.pool import PoolBackend
from ..codec import Call, ckr
from ..errors import BackendUnavailable, Pkcs11Error
from ..state.base import StoreError as RegistryError
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")


def sharing(c: ClientConnection, t: VirtualToken) -> list[VirtualToken]:
    """The virtual tokens served by the same backend token as ``t`` (``t`` included)."""
    return [x for x in c.gw.tokens
            if x is t or (x.backend is t.backend and x.backend_slot == t.backend_slot
                          and x.backend_slot is not None)]


async def h_init_token(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    t = await c._slot_token(args[0])
    if c.gw.layer_views.offers(t):  # a token offered uninitialised: make one
        return await c.gw.layer_views.make_token(c, t, call, args)
    c.require(t, "so", "C_InitToken")
    if isinstance(t.backend, PoolBackend):
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "C_InitToken of a pool token")
    if t.gateway_login:
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, f"C_InitToken with pin_mode {t.pin_mode}")
    same = sharing(c, t)
    for conn in c.gw.connections:
        if any(s.token in same for s in conn.handles.sessions.values()):
            raise Pkcs11Error(ckr.SESSION_EXISTS)
    c.gw.audit.attempt(call.name, c.peer, t.name)  # cannot be undone: audited before
    for x in same:
        await x.release_backend()
    try:
        reply = await t.backend.call(call.id, [t.backend_slot, *args[1:]])
    except BackendUnavailable:
        c.gw.audit.record_best_effort(call.name, ckr.DEVICE_ERROR, c.peer, t.name)
        raise Pkcs11Error(ckr.DEVICE_ERROR) from None
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name)
        raise
    finally:
        await _reattach(same)
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name)
    for conn in c.gw.connections:
        for x in same:
            for ref in conn.handles.objects_of(x):
                conn.handles.drop_object(ref.handle)
    for x in same:
        x.session_objects.clear()
        try:  # the objects are gone: so is their ownership (namespaces "owned")
            c.gw.ownership.release_token(x.name)
        except RegistryError as e:
            log.error("ownership of the initialized token's objects not forgotten",
                      extra={"token": x.name, "error": str(e)})
    log.info("token initialized", extra={"conn": c.id, "peer": c.peer, "token": t.name})
    return reply


async def _reattach(tokens: list[VirtualToken]) -> None:
    for x in tokens:
        try:
            await x.ensure()
        except Pkcs11Error as e:
            # e.g. selected by a label the token no longer has: not present until it does
            log.warning("token not attached after C_InitToken",
                        extra={"token": x.name, "rv": ckr.name(e.rv)})

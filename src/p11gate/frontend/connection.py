"""One client connection: the p11-kit RPC server side, virtual handles, login emulation.

A connection is one PKCS#11 application instance (one ``C_GetFunctionList`` in the
client). Calls for different sessions run concurrently and are answered as they finish
(the p11-kit client matches replies by call code); calls on one session stay in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..codec import (
    MAX_VERSION,
    ArgumentError,
    Call,
    FrameReader,
    Mechanism,
    ProtocolError,
    build_frame,
    ckr,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
)
from ..codec.call_table import PLANS, CallPlan
from ..errors import Pkcs11Error
from ..identity import UNKNOWN, Identity
from ..metrics import CallSeries
from ..policy import Denied, Grant, require
from . import (
    call_stats,
    forwarding,
    init_token,
    login_calls,
    object_calls,
    session_calls,
    translation,
)
from .common import ID
from .handles import (
    RUNNING_ON,
    HandleTable,
    ObjectRef,
    Session,
)
from .limits import ConnectionFlow, refusal_log
from .operations import duplicate_type, incomplete_key, unavailable_type
from .replies import error_reply
from .token import VirtualToken

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger("p11gate.conn")

_ids = itertools.count(1)

Handler = Callable[["ClientConnection", Call, list[Any]], Awaitable[list[Any]]]


class ClientConnection(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(gateway.cfg.server.max_frame)
        self.dialect = dialect_for_version(0)
        self.have_version = False
        self.initialized = False
        self.handles = HandleTable()
        #: token → CKU_* this connection is logged in as
        self.logins: dict[VirtualToken, int] = {}
        #: tokens this connection is logging out of: until its handles to private
        #: objects are dropped, none of them (nor one not known to be public) is used
        self.logging_out: set[VirtualToken] = set()
        self.identity: Identity = UNKNOWN
        #: what policy lets this identity do on each token it may see
        self.grants: dict[VirtualToken, Grant] = {}
        self.peer = "unknown"
        self._tail: asyncio.Future[None] | None = None  # ordering of session-less calls
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        #: frame code → (its token's counters or None, start time, its metrics series),
        #: for `status`, `top` and /metrics
        self.call_started: dict[
            int, tuple[call_stats.CallStats | None, float, CallSeries]] = {}
        #: the listen address it came in on (metrics label; set by the gateway)
        self.listener = ""
        #: back-pressure and the frame deadline (limits.py)
        self.flow = ConnectionFlow(gateway.cfg.server, self.reader, self.id, self._dispatch,
                                   self._abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write()
        self.transport = cast(asyncio.Transport, transport)
        ident = self.gw.identify(self.transport)
        if ident is None:
            log.warning("connection without identity refused", extra={"conn": self.id})
            self.gw.metrics.identity_refused += 1
            self.transport.abort()
            return
        if not self.gw.limits.admit(self, ident):
            self.transport.abort()  # a connection beyond a limit: closed at once
            return
        self.flow.attach(self.transport)
        self.identity = ident
        self.peer = ident.describe()
        by_name = self.gw.policy.grants_for(ident, [t.name for t in self.gw.tokens])
        self.grants = self.gw.layer_views.grants(ident, by_name)
        log.info("client connected", extra={"conn": self.id, "peer": self.peer})

    def data_received(self, data: bytes) -> None:
        if self.identity is UNKNOWN:
            return  # refused in connection_made; the transport is closing
        if not self.have_version:
            offered = data[0]
            self.have_version = True
            self.dialect = dialect_for_version(offered)
            assert self.transport is not None
            self.transport.write(bytes([min(offered, MAX_VERSION)]))
            data = data[1:]
            if not data:
                return
        try:
            self.flow.receive(data)
        except ProtocolError as e:
            self._abort(f"protocol error: {e}")

    def eof_received(self) -> bool | None:
        """The client shut its write side (``shutdown(SHUT_WR)``): on the unix socket
        the requests it sent whole are answered, then the connection is closed (limits.py,
        ConnectionFlow.end_of_input). Over TLS the TLS layer ends the connection at a
        close_notify whatever this returns (asyncio's and uvloop's SSL protocol stop
        writing, then shut down; a TCP FIN without close_notify does not come here):
        the replies already made, also those held by the connection, are still sent, the
        calls under way are not answered (README, "From another machine")."""
        if self.identity is UNKNOWN or self.transport is None:
            return None
        if self.transport.get_extra_info("ssl_object") is not None:
            self.flow.flush()
            log.info("client ended TLS (close_notify): calls under way are not answered",
                     extra={"conn": self.id, "in_flight": self.flow.in_flight})
            return None
        if self._peer_closed():
            return None  # a hang-up, not a half-close: nobody would read the replies
        log.info("client shut its side: answering the calls received, then closing",
                 extra={"conn": self.id, "in_flight": self.flow.in_flight})
        self.flow.end_of_input()
        return True

    def _peer_closed(self) -> bool:
        """End of input from a client that closed its socket, not one that only shut its
        write side: the unix socket then reports POLLHUP (both directions shut). Its
        calls still queued are dropped, never started (connection_lost), as before
        half-close was honoured: minutes of key generation for a client gone."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLHUP)
            return any(ev & select.POLLHUP for _, ev in poller.poll(0))
        except (OSError, ValueError):
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.flow.close()
        log.info("client disconnected", extra={"conn": self.id})
        self.gw.forget(self)
        self.gw.fair_share.drop_queued(self)
        t = asyncio.get_running_loop().create_task(self._cleanup())
        self.gw.background.add(t)
        t.add_done_callback(self.gw.background.discard)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def close_revoked(self) -> None:
        """The client's certificate was revoked after its handshake (frontend/revocation)."""
        self._abort("client certificate revoked by the CRL")

    def _abort(self, reason: str) -> None:
        refusal_log.warning("closing client connection", who=self.identity.key, conn=self.id,
                            peer=self.peer, reason=reason)
        if self.transport is not None:
            self.transport.abort()

    def _dispatch(self, code: int, body: bytes) -> None:
        try:
            call, args = decode_request(body, self.dialect)
        except ArgumentError as e:
            self.flow.started(code, 0, [])
            self._reply(code, encode_error(e.rv))
            return
        d = DISPATCH[call.id]
        if d is None:
            raise ProtocolError(f"call {call.name} not served")
        plan = d.plan
        call_stats.started(self, code, call.id, args)
        self.flow.started(code, call.id, args, len(body))  # released by _reply
        if plan.template_args:
            refusal = self._template_refusal(call, args, plan.template_args)
            if refusal is not None:
                self._reply(code, encode_error(refusal))
                return
        # calls on one session run in order; others run concurrently
        session = self.handles.sessions.get(args[0]) if plan.session else None
        prev = session.tail if session is not None else self._tail
        if (d.forwarded and session is not None and (prev is None or prev.done())
                and not session.fenced):
            forwarding.forward_now(self, code, call, args, session, plan)
            return
        task = asyncio.get_running_loop().create_task(
            self._run(code, call, args, d.handler, prev)
        )
        fut: asyncio.Future[None] = task
        if session is not None:
            session.tail = fut
        elif not d.unordered:
            self._tail = fut
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _template_refusal(self, call: Call, args: list[Any], positions: tuple[int, ...]
                          ) -> int | None:
        """Templates refused before policy or the module: one that names an attribute
        type twice (the gateway would check one value and the module apply another:
        CKR_TEMPLATE_INCONSISTENT), and one with an attribute marked unavailable (a
        NULL value of length (CK_ULONG)-1, which SoftHSM reads as a real value and
        crashes on in key generation: CKR_ATTRIBUTE_VALUE_INVALID); and a key for
        C_CreateObject without an attribute it must have (CKR_TEMPLATE_INCOMPLETE, as
        the module answers, but the module keeps half an object: operations.py)."""
        for pos in positions:
            dup = duplicate_type(args[pos])
            if dup is not None:
                refusal_log.warning("template names an attribute twice", who=self.identity.key,
                                    conn=self.id, peer=self.peer, call=call.name,
                                    attribute=f"{dup:#x}")
                return ckr.TEMPLATE_INCONSISTENT
            missing = unavailable_type(args[pos])
            if missing is not None:
                refusal_log.warning("template has an attribute without a value",
                                    who=self.identity.key, conn=self.id, peer=self.peer,
                                    call=call.name, attribute=f"{missing:#x}")
                return ckr.ATTRIBUTE_VALUE_INVALID
        if call.id == ID["C_CreateObject"]:
            lacking = incomplete_key(args[1])
            if lacking is not None:
                refusal_log.warning("key template without a required attribute",
                                    who=self.identity.key, conn=self.id, peer=self.peer,
                                    call=call.name, attribute=f"{lacking:#x}")
                return ckr.TEMPLATE_INCOMPLETE
        return None

    async def _run(
        self,
        code: int,
        call: Call,
        args: list[Any],
        handler: Handler,
        prev: asyncio.Future[None] | None,
    ) -> None:
        if prev is not None and not prev.done():
            await asyncio.wait((prev,))
        if PLANS[call.id].session:  # this task's own context: see handles.settle
            RUNNING_ON.set(self.handles.sessions.get(args[0]))
        try:
            if not self.initialized and call.id != ID["C_Initialize"]:
                raise Pkcs11Error(ckr.CRYPTOKI_NOT_INITIALIZED)
            values = await handler(self, call, args)
            body = encode_reply(call.id, values, self.dialect, args)
        except Exception as e:
            body = error_reply(self, call, e)
        self._reply(code, body)

    def _reply(self, code: int, body: bytes) -> None:
        call_stats.answered(self, code, body)
        self.flow.write(build_frame(code, body))
        self.flow.finished(code)

    def _token(self, slot_id: int) -> VirtualToken:
        t = self.gw.tokens_by_slot.get(slot_id)
        if t is None or t not in self.grants:  # layered: this identity's own token
            t = next((g for g in self.grants if g.slot_id == slot_id), None)
        if t is None or t not in self.grants:
            # a token this identity may not see has no slot
            raise Pkcs11Error(ckr.SLOT_ID_INVALID)
        return t

    def require(self, token: VirtualToken, permission: str, what: str) -> None:
        grant = self.grants.get(token)
        if grant is None:  # a reload revoked it while this call was under way
            raise Pkcs11Error(ckr.SLOT_ID_INVALID)
        require(grant, permission, what, token.name)

    def _denied(self, call: Call, e: Denied) -> None:
        self.gw.metrics.policy_denials.labels(e.token or "").inc()
        refusal_log.warning("denied by policy", who=self.identity.key, conn=self.id, peer=self.peer,
                            call=call.name, token=e.token, what=e.what, rule=e.rule,
                            rv=ckr.name(e.rv))
        self.gw.audit.record_best_effort(call.name, e.rv, self.peer, e.token, denied=e.what,
                                        rule=e.rule)

    # the handle translation other modules ask of a connection (translation.py)
    def session_for(self, handle: int) -> Session:
        return translation.session_for(self, handle)

    def object_for(self, handle: int, token: VirtualToken) -> ObjectRef:
        return translation.object_for(self, handle, token)

    def mint(self, token: VirtualToken, backend_handle: int, generation: int,
             private: bool | None) -> int:
        return translation.mint(self, token, backend_handle, generation, private)

    async def revive(self, ref: ObjectRef) -> None:
        await translation.revive(self, ref)

    object_fields_of = staticmethod(translation.object_fields_of)

    async def forward(self, call: Call, args: list[Any]) -> list[Any]:
        return await forwarding.forward(self, call, args)

    def _mechanism(self, m: Mechanism | None, token: VirtualToken) -> Mechanism | None:
        return translation.mechanism(self, m, token)

    async def _slot_token(self, slot_id: int) -> VirtualToken:
        return await session_calls.slot_token(self, slot_id)

    async def _close_sessions(self, t: VirtualToken) -> None:
        await session_calls.close_sessions(self, t)

    def logged_in(self, token: VirtualToken) -> bool:
        return token in self.logins

    async def _cleanup(self) -> None:
        """C_Finalize or a closed connection: end this connection's sessions and logins,
        never the backend's."""
        for t in list(self.logins):
            try:
                await login_calls.logout(self, t, closing=True)
            except Exception:
                log.exception("logout at close failed", extra={"conn": self.id})
        for t in {s.token for s in self.handles.sessions.values()}:
            await session_calls.close_sessions(self, t)
        for t in {*self.gw.tokens, *self.grants}:  # per-identity layered tokens too
            if t.session_objects:
                for key in [k for k, v in t.session_objects.items() if v == self.id]:
                    del t.session_objects[key]
        self.gw.limits.finalized(self)
        self.handles = HandleTable()


# calls that need no ordering against other session-less calls
_UNORDERED = frozenset({ID["C_GetInfo"], ID["C_GetSlotList"], ID["C_GetSlotInfo"],
                        ID["C_GetTokenInfo"], ID["C_GetMechanismList"],
                        ID["C_GetMechanismInfo"], ID["C_WaitForSlotEvent"]})

#: the calls a connection answers itself or routes by slot; every other session call is
#: forwarded
_SPECIAL: dict[str, Handler] = {
    "C_Initialize": session_calls.h_initialize,
    "C_Finalize": session_calls.h_finalize,
    "C_GetInfo": session_calls.h_get_info,
    "C_GetSlotList": session_calls.h_get_slot_list,
    "C_GetSlotInfo": session_calls.h_get_slot_info,
    "C_GetTokenInfo": session_calls.h_get_token_info,
    "C_GetMechanismList": session_calls.h_slot_forward,
    "C_GetMechanismInfo": session_calls.h_slot_forward,
    "C_InitToken": init_token.h_init_token,
    "C_InitToken2": init_token.h_init_token,
    "C_OpenSession": session_calls.h_open_session,
    "C_CloseSession": session_calls.h_close_session,
    "C_CloseAllSessions": session_calls.h_close_all_sessions,
    "C_GetSessionInfo": session_calls.h_get_session_info,
    "C_Login": login_calls.h_login,
    "C_LoginUser": login_calls.h_login,
    "C_Logout": login_calls.h_logout,
    "C_SetPIN": login_calls.h_set_pin,
    "C_FindObjectsInit": object_calls.h_find_init,
    "C_FindObjects": object_calls.h_find,
    "C_FindObjectsFinal": object_calls.h_find_final,
    "C_DestroyObject": object_calls.h_destroy,
    "C_SetAttributeValue": object_calls.h_set_attribute,
    "C_InitPIN": login_calls.h_init_pin,
    "C_CreateObject": object_calls.h_create,
    "C_CopyObject": object_calls.h_create,
    "C_GenerateKey": object_calls.h_create,
    "C_GenerateKeyPair": object_calls.h_create,
    "C_UnwrapKey": object_calls.h_create,
    "C_DeriveKey": object_calls.h_create,
    "C_DeriveKey2": object_calls.h_create,
    "C_WaitForSlotEvent": session_calls.h_wait_for_slot_event,
    "C_SetOperationState": forwarding.h_set_operation_state,
}
_FORWARD: Handler = forwarding.forward


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One call's compiled dispatch: its plan (codec call table) and its handler."""

    plan: CallPlan
    handler: Handler
    #: answered at once by forwarding.forward_now when its session has nothing queued
    forwarded: bool
    #: a session-less call that needs no ordering against the others
    unordered: bool


def _compile() -> tuple[Dispatch | None, ...]:
    out: list[Dispatch | None] = []
    for plan in PLANS:
        name = plan.call.name
        handler = _SPECIAL.get(name) or (_FORWARD if plan.session else None)
        out.append(None if handler is None else Dispatch(
            plan, handler, handler is _FORWARD, plan.call.id in _UNORDERED))
    assert all(d is not None for d in out[1:]), "every call id 1..89 must be served"
    return tuple(out)


#: call id → its dispatch (index 0, ERROR, is no request)
DISPATCH = _compile()

"""One client connection: the p11-kit RPC server side, virtual handles, login emulation.

A connection is one PKCS#11 application instance (one ``C_GetFunctionList`` in the
client). Calls for different sessions run concurrently and are answered as they finish
(the p11-kit client matches replies by call code); calls on one session stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ..audit import AuditError, object_fields
from ..codec import (
    HANDSHAKE,
    MAX_VERSION,
    ArgumentError,
    Attribute,
    AttrRequest,
    Call,
    CodecError,
    FrameReader,
    Mechanism,
    Null,
    ProtocolError,
    Version,
    build_frame,
    ckr,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
    reply_rv,
)
from ..codec import constants as ck
from ..codec.param_kinds import (
    HANDLE_IN_RAW_PARAM,
    MESSAGE_PARAMETER_CALLS,
    message_parameter_refusal,
    raw_parameter_refusal,
)
from ..codec.values import HandleParam, KyberParams
from ..errors import BackendUnavailable, Pkcs11Error
from ..identity import UNKNOWN, Identity
from ..metrics import CallSeries
from ..policy import Denied, Grant, require
from . import call_stats, fail_closed, init_token, login_calls, object_calls, precedence
from .common import ID, PRIVATE_FALSE, RESTART_WAIT, Stale
from .handles import (
    IDENTITY_KNOWN,
    IDENTITY_NONE,
    IDENTITY_PENDING,
    IDENTITY_UNKNOWN,
    HandleTable,
    ObjectRef,
    Session,
)
from .limits import ConnectionFlow
from .operations import check_fence, duplicate_type, lift_fence, note_key_init
from .tables import (
    ATTR_REQUEST_ARG,
    CAPACITY_ARGS,
    CREATE_TEMPLATES,
    KEY_ARGS,
    KEY_USE,
    MECHANISM_CALLS,
    NEW_OBJECTS,
    OBJECT_ARGS,
    OPERATION_OF_INIT,
    OPTIONAL_OBJECT_ARGS,
    RELAYABLE_REPLIES,
    SESSION_CALLS,
    SLOT_CALLS,
    TEMPLATE_ARGS,
)
from .token import VirtualToken, pad

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger("p11gate.conn")

_ids = itertools.count(1)

_DEFAULT_PRIVATE_CLASSES = {ck.CKO_PRIVATE_KEY, ck.CKO_SECRET_KEY}
#: creating these yields private/secret keys, which tokens make private by default
_KEY_MAKERS = {ID["C_GenerateKey"], ID["C_UnwrapKey"], ID["C_DeriveKey"], ID["C_DeriveKey2"]}

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

    # ------------------------------------------------------------ transport

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
        self.grants = {t: by_name[t.name] for t in self.gw.tokens if t.name in by_name}
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

    def _abort(self, reason: str) -> None:
        log.warning("closing client connection", extra={"conn": self.id, "reason": reason})
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, code: int, body: bytes) -> None:
        try:
            call, args = decode_request(body, self.dialect)
        except ArgumentError as e:
            self.flow.started(code, 0, [])
            self._reply(code, encode_error(e.rv))
            return
        handler = HANDLERS.get(call.id)
        if handler is None:
            raise ProtocolError(f"call {call.name} not served")
        call_stats.started(self, code, call.id, args)
        self.flow.started(code, call.id, args, len(body))  # released by _reply
        templates = TEMPLATE_ARGS.get(call.id)
        if templates is not None and self._duplicated(call, args, templates):
            self._reply(code, encode_error(ckr.TEMPLATE_INCONSISTENT))
            return
        # calls on one session run in order; others run concurrently
        session = None
        if call.id in SESSION_CALLS:
            session = self.handles.sessions.get(args[0])
        prev = session.tail if session is not None else self._tail
        if (handler is _FORWARD and session is not None and (prev is None or prev.done())
                and not session.fenced):
            self._forward_now(code, call, args, session)
            return
        task = asyncio.get_running_loop().create_task(
            self._run(code, call, args, handler, prev)
        )
        fut: asyncio.Future[None] = task
        if session is not None:
            session.tail = fut
        else:
            self._tail = fut if call.id not in _UNORDERED else self._tail
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _duplicated(self, call: Call, args: list[Any], positions: tuple[int, ...]) -> bool:
        """A template that names one attribute type twice: the gateway would check one
        value and the module apply another. Refused before policy or the module."""
        for pos in positions:
            dup = duplicate_type(args[pos])
            if dup is not None:
                log.warning("template names an attribute twice", extra={
                    "conn": self.id, "peer": self.peer, "call": call.name,
                    "attribute": f"{dup:#x}"})
                return True
        return False

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
        try:
            if not self.initialized and call.id != ID["C_Initialize"]:
                raise Pkcs11Error(ckr.CRYPTOKI_NOT_INITIALIZED)
            values = await handler(self, call, args)
            body = encode_reply(call.id, values, self.dialect, args)
        except Denied as e:
            self._denied(call, e)
            body = encode_error(e.rv)
        except Pkcs11Error as e:
            body = encode_error(e.rv)
        except ArgumentError as e:
            body = encode_error(e.rv)
        except CodecError as e:
            log.error("cannot encode reply", extra={"conn": self.id, "call": call.name,
                                                    "error": str(e)})
            body = encode_error(ckr.DEVICE_ERROR)
        except Exception:
            log.exception("internal error", extra={"conn": self.id, "call": call.name})
            body = encode_error(ckr.GENERAL_ERROR)
        self._reply(code, body)

    def _reply(self, code: int, body: bytes) -> None:
        call_stats.answered(self, code, body)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(build_frame(code, body))
        self.flow.finished(code)

    # ------------------------------------------------------------ lookups

    def _token(self, slot_id: int) -> VirtualToken:
        t = self.gw.tokens_by_slot.get(slot_id)
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
        log.warning("denied by policy", extra={
            "conn": self.id, "peer": self.peer, "call": call.name, "token": e.token,
            "what": e.what, "rule": e.rule, "rv": ckr.name(e.rv)})
        self.gw.audit.record_best_effort(call.name, e.rv, self.peer, e.token, denied=e.what,
                                        rule=e.rule)

    def _audit_key_use(self, call: Call, args: list[Any], rv: int) -> None:
        """One audit record per key use: who, which key (its identity when known),
        which mechanism, and the result. Never data or key material. Raises AuditError
        (required audit) only for a success: a failed call fails anyway."""
        audit = self.gw.audit
        if not audit.enabled:
            return
        s = self.handles.sessions.get(args[0])
        pos = OBJECT_ARGS[call.id][0]
        ref = self.handles.objects.get(args[pos])
        fields: dict[str, Any] = {"object": self.object_fields_of(ref) if ref else {}}
        m = args[1] if call.id in MECHANISM_CALLS else None
        if isinstance(m, Mechanism):
            fields["mechanism"] = f"{m.type:#x}"
        record = audit.record if rv == ckr.OK else audit.record_best_effort
        record(call.name, rv, self.peer, s.token.name if s else None, **fields)

    @staticmethod
    def object_fields_of(ref: ObjectRef) -> dict[str, Any]:
        if ref.identity is None:
            return {"handle": ref.handle}
        vals = {a.type: a.value for a in ref.identity}
        return object_fields(vals.get(ck.CKA_CLASS), vals.get(ck.CKA_ID),
                             vals.get(ck.CKA_LABEL))

    def session_for(self, handle: int) -> Session:
        s = self.handles.sessions.get(handle)
        if s is None:
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        if s.generation != s.token.backend.generation:
            # its backend instance died: the session went with it
            del self.handles.sessions[handle]
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        return s

    def object_for(self, handle: int, token: VirtualToken) -> ObjectRef:
        ref = self.handles.objects.get(handle)
        if ref is None or ref.token is not token:
            raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
        if ref.generation != token.backend.generation:
            if ref.identity_state == IDENTITY_KNOWN:
                raise Stale(ref)  # a token object: find it again, keep the handle
            self.handles.drop_object(handle)
            raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
        return ref

    def mint(self, token: VirtualToken, backend_handle: int, generation: int,
              private: bool | None) -> int:
        h = self.handles.object_for(token, backend_handle, generation, private)
        ref = self.handles.objects[h]
        if ref.identity_state == IDENTITY_UNKNOWN:
            ref.identity_state = IDENTITY_PENDING
            t = asyncio.get_running_loop().create_task(self._capture_identity(ref))
            self.gw.background.add(t)
            t.add_done_callback(self.gw.background.discard)
        return h

    async def _capture_identity(self, ref: ObjectRef) -> None:
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
        ref.identity = [a for a in attrs[1:] if a.length is not None]
        ref.identity_state = IDENTITY_KNOWN

    async def revive(self, ref: ObjectRef) -> None:
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
            self.handles.drop_object(ref.handle)
            raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
        self.handles.rebind(ref, found[0], gen)
        log.info("object handle rebound after backend restart",
                 extra={"conn": self.id, "token": t.name, "handle": ref.handle})

    def logged_in(self, token: VirtualToken) -> bool:
        return token in self.logins

    def _mechanism(self, m: Mechanism | None, token: VirtualToken) -> Mechanism | None:
        if m is None:
            return m
        p = m.param
        if isinstance(p, HandleParam):
            try:
                ref = self.object_for(p.handle, token)
            except Pkcs11Error as e:  # the parameter's handle is a key's
                if e.rv == ckr.OBJECT_HANDLE_INVALID:
                    raise Pkcs11Error(ckr.KEY_HANDLE_INVALID) from None
                raise
            return Mechanism(m.type, HandleParam(ref.backend_handle))
        if isinstance(p, KyberParams) and p.secret_handle:
            bh = self.object_for(p.secret_handle, token).backend_handle
            return Mechanism(m.type, p._replace(secret_handle=bh))
        if m.type in HANDLE_IN_RAW_PARAM and p is not None:
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "parameter carries a handle")
        if isinstance(p, bytes):  # no serializer built it: only a flat parameter passes
            why = raw_parameter_refusal(m.type, len(p), token.backend.raw_parameter_mechanisms)
            if why is not None:
                raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, why)
        return m

    # ------------------------------------------------------------ generic session call

    def _prepare(
        self, call: Call, args: list[Any]
    ) -> tuple[Session, list[Any], list[bool | None]]:
        """Translate a session call's handles to the backend's (synchronously: nothing
        may await between the generation check and the send)."""
        s = self.session_for(args[0])
        token = s.token
        if call.id in KEY_USE:
            self.require(token, "use", "key use")
        if s.fenced:
            check_fence(s, call.id)
        bargs = list(args)
        bargs[0] = s.backend_handle
        for pos in OBJECT_ARGS.get(call.id, ()):
            if bargs[pos] == 0 and call.id in OPTIONAL_OBJECT_ARGS:
                continue
            try:
                ref = self.object_for(bargs[pos], token)
            except Pkcs11Error as e:
                role = KEY_ARGS.get((call.id, pos))
                if e.rv == ckr.OBJECT_HANDLE_INVALID and role is not None:
                    # the module's handle-independent refusal comes first (precedence.py)
                    raise precedence.refusal(self, s, call.id, bargs, pos, role) from None
                raise
            bargs[pos] = ref.backend_handle
            if call.id in OPERATION_OF_INIT and pos == OBJECT_ARGS[call.id][0]:
                note_key_init(s, call.id, ref, token in self.logins)
        if call.id in MECHANISM_CALLS:
            bargs[1] = self._mechanism(bargs[1], token)
        elif call.id in MESSAGE_PARAMETER_CALLS and message_parameter_refusal(bargs[1]):
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "per-message parameter")
        caps = CAPACITY_ARGS.get(call.id)
        if caps is not None:
            self._bound_outputs(bargs, caps)
        elif call.id in ATTR_REQUEST_ARG:
            self._bound_attr_requests(bargs[ATTR_REQUEST_ARG[call.id]])
        templates = CREATE_TEMPLATES.get(call.id)
        private: list[bool | None] = []
        if templates is not None:
            private = self._creation_rules(call, bargs, templates, token)
        return s, bargs, private

    def _bound_outputs(self, bargs: list[Any], caps: tuple[tuple[int, int], ...]) -> None:
        """A client may announce any output capacity; the backend would allocate it.
        Clamp to max_buffer: a result that really is larger comes back as
        CKR_BUFFER_TOO_SMALL with its true size."""
        limit = self.gw.cfg.server.max_buffer
        for pos, item in caps:
            cap = bargs[pos]
            if cap * item > limit and cap != 0xFFFFFFFF:
                bargs[pos] = limit // item

    def _bound_attr_requests(self, reqs: list[AttrRequest]) -> None:
        if _requested_bytes(reqs) > self.gw.cfg.server.max_buffer:
            raise Pkcs11Error(ckr.HOST_MEMORY, "attribute buffers too large")

    def _finish(
        self, call: Call, s: Session, private: list[bool | None], reply: list[Any]
    ) -> list[Any]:
        """Give new objects in a reply virtual handles."""
        new = NEW_OBJECTS.get(call.id)
        if new is not None and not (call.id == ID["C_DeriveKey2"] and len(reply) < 3):
            for i, pos in enumerate(new):
                priv = private[min(i, len(private) - 1)] if private else None
                reply[pos] = self.mint(s.token, reply[pos], s.generation, priv)
        return reply

    def _relay(self, code: int, call: Call, args: list[Any] | None,
               f: asyncio.Future[bytes]) -> None:
        try:
            body = f.result()
        except (BackendUnavailable, TimeoutError):
            body = encode_error(ckr.DEVICE_ERROR)
        except Pkcs11Error as e:
            body = encode_error(e.rv)
        except Exception:
            log.exception("internal error", extra={"conn": self.id, "call": call.name})
            body = encode_error(ckr.GENERAL_ERROR)
        if args is not None:
            try:
                self._audit_key_use(call, args, reply_rv(body))
            except AuditError as e:
                s = self.handles.sessions.get(args[0])
                body = fail_closed.unaudited_reply(self, call, s, f, e)
        self._reply(code, body)

    async def forward(self, call: Call, args: list[Any]) -> list[Any]:
        for _ in range(4):
            try:
                s, bargs, private = self._prepare(call, args)
                break
            except Stale as stale:
                await self.revive(stale.ref)
            except precedence.Unresolved as u:
                raise await u.resolve() from None
        else:
            raise Pkcs11Error(ckr.DEVICE_ERROR, "backend restarting repeatedly")
        try:
            reply = await self.gw.fair_share.submit(
                s.token.backend, self.identity.key, call.id, bargs, self)
        except (BackendUnavailable, TimeoutError):
            # in flight when the backend died or hung; the session is gone with it
            if call.id in KEY_USE:
                self._audit_key_use(call, args, ckr.DEVICE_ERROR)
            raise Pkcs11Error(ckr.DEVICE_ERROR) from None
        except Pkcs11Error as e:
            if call.id in KEY_USE:
                self._audit_key_use(call, args, e.rv)
            raise
        if call.id in KEY_USE:
            try:
                self._audit_key_use(call, args, ckr.OK)
            except AuditError:
                await fail_closed.undo_key_use(self, call, s, reply)
                raise
        if s.fenced:
            lift_fence(s, call.id)
        return self._finish(call, s, private, reply)

    def _forward_now(self, code: int, call: Call, args: list[Any], s: Session) -> None:
        """The hot path: a plain session call with nothing queued before it on that
        session is sent to the backend at once, and answered from a done-callback —
        no task, no coroutine."""
        try:
            if not self.initialized:
                raise Pkcs11Error(ckr.CRYPTOKI_NOT_INITIALIZED)
            s, bargs, private = self._prepare(call, args)
            if call.id in RELAYABLE_REPLIES:
                raw = self.gw.fair_share.submit_raw(
                    s.token.backend, self.identity.key, call.id, bargs)
                if raw is not None:
                    s.tail = raw  # type: ignore[assignment]
                    raw.add_done_callback(functools.partial(
                        self._relay, code, call, args if call.id in KEY_USE else None))
                    return
            fut = self.gw.fair_share.submit(
                s.token.backend, self.identity.key, call.id, bargs, self)
        except Denied as e:
            self._denied(call, e)
            self._reply(code, encode_error(e.rv))
            return
        except (Pkcs11Error, ArgumentError) as e:
            if not isinstance(e, precedence.Unresolved):
                self._reply(code, encode_error(e.rv))
                return
            # the module must be asked first: on the slow path, as for a stale handle
            task = asyncio.get_running_loop().create_task(
                self._run(code, call, args, ClientConnection.forward, None))
            s.tail = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        except Stale:
            # an object handle from before a backend restart: find it again first
            task = asyncio.get_running_loop().create_task(
                self._run(code, call, args, ClientConnection.forward, None))
            s.tail = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        except Exception:
            # a fault of the gateway's own costs this call, never the connection
            log.exception("internal error", extra={"conn": self.id, "call": call.name})
            self._reply(code, encode_error(ckr.GENERAL_ERROR))
            return
        s.tail = fut  # type: ignore[assignment]

        def done(f: asyncio.Future[list[Any]]) -> None:
            try:
                values = self._finish(call, s, private, f.result())
                body = encode_reply(call.id, values, self.dialect, args)
            except (BackendUnavailable, TimeoutError):
                body = encode_error(ckr.DEVICE_ERROR)
            except (Pkcs11Error, ArgumentError) as e:
                body = encode_error(e.rv)
            except Exception:
                log.exception("internal error", extra={"conn": self.id, "call": call.name})
                body = encode_error(ckr.GENERAL_ERROR)
            if call.id in KEY_USE:
                try:
                    self._audit_key_use(call, args, reply_rv(body))
                except AuditError as e:
                    body = fail_closed.unaudited_reply(self, call, s, f, e)
            self._reply(code, body)

        fut.add_done_callback(done)

    def _creation_rules(
        self, call: Call, bargs: list[Any], positions: tuple[int, ...], token: VirtualToken
    ) -> list[bool | None]:
        """PKCS#11's rules for object creation in a public session, over a backend that
        may be logged in for another connection. Returns the known CKA_PRIVATE of each
        object to be created (None = token default)."""
        out: list[bool | None] = []
        public_session = not self.logged_in(token) and token.login.backend_logged_in
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

    # ------------------------------------------------------------ handlers

    async def h_initialize(self, call: Call, args: list[Any]) -> list[Any]:
        if args[0] != HANDSHAKE:
            raise Pkcs11Error(ckr.GENERAL_ERROR, "bad handshake")
        if self.initialized:
            raise Pkcs11Error(ckr.CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True
        return []

    async def h_finalize(self, call: Call, args: list[Any]) -> list[Any]:
        # from here on only C_Initialize is served (the check in _run and _forward_now)
        self.initialized = False
        await self._cleanup()
        return []

    async def h_get_info(self, call: Call, args: list[Any]) -> list[Any]:
        return [
            Version(2, 40),
            pad("p11gate", 32),
            0,
            pad("p11gate PKCS#11 gateway", 32),
            Version(0, 1),
        ]

    async def h_get_slot_list(self, call: Call, args: list[Any]) -> list[Any]:
        # A token whose backend is restarting stays listed: calls that open something
        # wait for the restart, so a client never sees its slot vanish for a moment.
        capacity = args[1]
        slots = [t.slot_id for t in self.gw.tokens if t in self.grants]
        if capacity < len(slots):
            return [Null(len(slots))]
        return [slots]

    async def h_get_slot_info(self, call: Call, args: list[Any]) -> list[Any]:
        t = self._token(args[0])
        flags = ck.CKF_REMOVABLE_DEVICE | ck.CKF_TOKEN_PRESENT
        return [pad(f"p11gate {t.name}", 64), pad("p11gate", 32), flags,
                Version(0, 1), Version(0, 1)]

    async def _slot_token(self, slot_id: int) -> VirtualToken:
        t = self._token(slot_id)
        if not t.backend.up:
            await t.backend.wait_up(RESTART_WAIT)
        try:
            await t.ensure()
        except BackendUnavailable:
            raise Pkcs11Error(ckr.TOKEN_NOT_PRESENT) from None
        return t

    async def h_get_token_info(self, call: Call, args: list[Any]) -> list[Any]:
        t = await self._slot_token(args[0])
        info = await t.backend.call(call.id, [t.backend_slot])
        mine = [s for s in self.handles.sessions.values() if s.token is t]
        info[0] = t.label
        flags = info[4]
        if self.grants[t].write_protected:
            flags |= ck.CKF_WRITE_PROTECTED
        if t.pin_mode == "none":
            flags |= ck.CKF_PROTECTED_AUTHENTICATION_PATH
        info[4] = flags
        info[6] = len(mine)
        info[8] = sum(1 for s in mine if s.flags & ck.CKF_RW_SESSION)
        return info

    async def h_slot_forward(self, call: Call, args: list[Any]) -> list[Any]:
        t = await self._slot_token(args[0])
        return await t.backend.call(call.id, [t.backend_slot, *args[1:]])

    async def h_open_session(self, call: Call, args: list[Any]) -> list[Any]:
        t = await self._slot_token(args[0])
        flags = args[1]
        if not flags & ck.CKF_SERIAL_SESSION:
            raise Pkcs11Error(ckr.SESSION_PARALLEL_NOT_SUPPORTED)
        if not flags & ck.CKF_RW_SESSION and self.logins.get(t) == ck.CKU_SO:
            # PKCS#11 §5.6: no read-only session while the SO is logged in
            raise Pkcs11Error(ckr.SESSION_READ_WRITE_SO_EXISTS)
        if flags & ck.CKF_RW_SESSION and self.grants[t].write_protected:
            # PKCS#11: a read/write session on a write-protected token
            raise Denied(ckr.TOKEN_WRITE_PROTECTED, self.grants[t].rule,
                         "read/write session", t.name)
        with self.gw.limits.opening_session(self):  # CKR_SESSION_COUNT beyond quotas
            gen = t.backend.generation
            try:
                (bh,) = await t.backend.call(call.id, [t.backend_slot, flags])
            except BackendUnavailable:
                raise Pkcs11Error(ckr.DEVICE_ERROR) from None
            s = self.handles.add_session(t, bh, gen, flags)
        return [s.handle]

    async def h_close_session(self, call: Call, args: list[Any]) -> list[Any]:
        s = self.session_for(args[0])
        del self.handles.sessions[s.handle]
        try:
            await s.token.backend.call(call.id, [s.backend_handle])
        except BackendUnavailable:
            pass
        await self._logout_if_last(s.token)
        return []

    async def h_close_all_sessions(self, call: Call, args: list[Any]) -> list[Any]:
        t = self._token(args[0])
        await self._close_sessions(t)
        await self._logout_if_last(t)
        return []

    async def _logout_if_last(self, t: VirtualToken) -> None:
        """PKCS#11: closing an application's last session with a token logs it out."""
        if t in self.logins and not any(x.token is t for x in self.handles.sessions.values()):
            await login_calls.logout(self, t)

    async def _close_sessions(self, t: VirtualToken) -> None:
        mine = [s for s in self.handles.sessions.values() if s.token is t]
        for s in mine:
            self.handles.sessions.pop(s.handle, None)
            if s.generation == t.backend.generation:
                try:
                    await t.backend.call(ID["C_CloseSession"], [s.backend_handle])
                except Pkcs11Error:
                    pass

    async def h_get_session_info(self, call: Call, args: list[Any]) -> list[Any]:
        s = self.session_for(args[0])
        rw = bool(s.flags & ck.CKF_RW_SESSION)
        user = self.logins.get(s.token)
        if user == ck.CKU_SO:
            state = ck.CKS_RW_SO_FUNCTIONS
        elif user == ck.CKU_USER:
            state = ck.CKS_RW_USER_FUNCTIONS if rw else ck.CKS_RO_USER_FUNCTIONS
        else:
            state = ck.CKS_RW_PUBLIC_SESSION if rw else ck.CKS_RO_PUBLIC_SESSION
        return [s.token.slot_id, state, s.flags & (ck.CKF_RW_SESSION | ck.CKF_SERIAL_SESSION), 0]

    async def h_wait_for_slot_event(self, call: Call, args: list[Any]) -> list[Any]:
        if args[0] & ck.CKF_DONT_BLOCK:
            raise Pkcs11Error(ckr.NO_EVENT)
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED)

    # ------------------------------------------------------------ teardown

    async def _cleanup(self) -> None:
        """C_Finalize or a closed connection: end this connection's sessions and logins,
        never the backend's."""
        for t in list(self.logins):
            try:
                await login_calls.logout(self, t, closing=True)
            except Exception:
                log.exception("logout at close failed", extra={"conn": self.id})
        for t in {s.token for s in self.handles.sessions.values()}:
            await self._close_sessions(t)
        for t in self.gw.tokens:
            if t.session_objects:
                for key in [k for k, v in t.session_objects.items() if v == self.id]:
                    del t.session_objects[key]
        self.gw.limits.finalized(self)
        self.handles = HandleTable()


def _requested_bytes(reqs: list[AttrRequest]) -> int:
    return sum(r.length + (_requested_bytes(r.nested) if r.nested else 0) for r in reqs)


# calls that need no ordering against other session-less calls
_UNORDERED = frozenset({ID["C_GetInfo"], ID["C_GetSlotList"], ID["C_GetSlotInfo"],
                        ID["C_GetTokenInfo"], ID["C_GetMechanismList"],
                        ID["C_GetMechanismInfo"], ID["C_WaitForSlotEvent"]})


def _build_handlers() -> dict[int, Handler]:
    C = ClientConnection
    special: dict[str, Handler] = {
        "C_Initialize": C.h_initialize,
        "C_Finalize": C.h_finalize,
        "C_GetInfo": C.h_get_info,
        "C_GetSlotList": C.h_get_slot_list,
        "C_GetSlotInfo": C.h_get_slot_info,
        "C_GetTokenInfo": C.h_get_token_info,
        "C_GetMechanismList": C.h_slot_forward,
        "C_GetMechanismInfo": C.h_slot_forward,
        "C_InitToken": init_token.h_init_token,
        "C_InitToken2": init_token.h_init_token,
        "C_OpenSession": C.h_open_session,
        "C_CloseSession": C.h_close_session,
        "C_CloseAllSessions": C.h_close_all_sessions,
        "C_GetSessionInfo": C.h_get_session_info,
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
        "C_WaitForSlotEvent": C.h_wait_for_slot_event,
    }
    out: dict[int, Handler] = {}
    for name, cid in ID.items():
        if name in special:
            out[cid] = special[name]
        elif cid in SESSION_CALLS:
            out[cid] = C.forward
    assert not (set(out) ^ set(range(1, 90))), "every call id 1..89 must be served"
    return out


HANDLERS = _build_handlers()
_FORWARD = ClientConnection.forward
assert SLOT_CALLS  # imported for readers: slot calls are the special handlers above

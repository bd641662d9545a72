"""Forwarding a session call to its backend: the async path (``forward``), the hot path
answered from a done-callback (``forward_now``), the raw relay of replies that need no
translation, and the audit record of each key use."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from ..audit import AuditError
from ..codec import (
    Call,
    Mechanism,
    ckr,
    encode_reply,
    reply_rv,
)
from ..codec.call_table import PLANS, CallPlan
from ..errors import BackendUnavailable, Pkcs11Error
from . import fail_closed, key_separation, key_types, precedence, translation
from .common import EndsOperation, KeyTypeUnknown, SlowPath, Stale, WrongKeyType
from .handles import (
    Session,
)
from .operations import end_operation, lift_fence
from .replies import error_reply

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")



def audit_key_use(c: ClientConnection, call: Call, args: list[Any], rv: int) -> None:
    """One audit record per key use: who, which key (its identity when known),
    which mechanism, and the result. Never data or key material. Raises AuditError
    (required audit) only for a success: a failed call fails anyway."""
    audit = c.gw.audit
    if not audit.enabled:
        return
    s = c.handles.sessions.get(args[0])
    plan = PLANS[call.id]
    ref = c.handles.objects.get(args[plan.object_args[0]])
    fields: dict[str, Any] = {"object": translation.object_fields_of(ref) if ref else {}}
    m = args[1] if plan.mechanism_arg is not None else None
    if isinstance(m, Mechanism):
        fields["mechanism"] = f"{m.type:#x}"
    record = audit.record if rv == ckr.OK else audit.record_best_effort
    record(call.name, rv, c.peer, s.token.name if s else None, **fields)


def relay(c: ClientConnection, code: int, call: Call, args: list[Any] | None,
           f: asyncio.Future[bytes]) -> None:
    try:
        body = f.result()
    except Exception as e:
        body = error_reply(c, call, e)
    if args is not None:
        try:
            audit_key_use(c, call, args, reply_rv(body))
        except AuditError as e:
            s = c.handles.sessions.get(args[0])
            body = fail_closed.unaudited_reply(c, call, s, f, e)
    c._reply(code, body)


async def forward(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    if call.id in key_separation.USE_CHECKED:  # reads the key's roles where asked to
        await key_separation.check_use(c, call, args)
    for _ in range(4):
        try:
            s, bargs, private = translation.prepare(c, call, args)
            break
        except Stale as stale:
            await translation.revive(c, stale.ref)
        except KeyTypeUnknown as unknown:
            s = c.session_for(args[0])
            try:
                await key_types.learn(s, unknown.ref)
            except Pkcs11Error as e:
                if e.rv != ckr.KEY_HANDLE_INVALID or unknown.probe is None:
                    raise
                # the key is gone: the module's answer whatever the key comes first
                # (an operation already active), as for any unknown handle
                probe, pos = unknown.probe
                role = PLANS[call.id].unknown_handle_codes[0] or ckr.KEY_HANDLE_INVALID
                raise await precedence.Unresolved(c, s, call.id, probe, pos,
                                                  role).resolve() from None
        except WrongKeyType as wrong:
            raise await key_types.refusal(c.session_for(args[0]), call.id, wrong,
                                          c) from None
        except EndsOperation as ends:
            await end_operation(c.session_for(args[0]), ends.op)
            raise Pkcs11Error(ends.rv, ends.why) from None
        except precedence.Unresolved as u:
            raise await u.resolve() from None
    else:
        raise Pkcs11Error(ckr.DEVICE_ERROR, "backend restarting repeatedly")
    key_use = PLANS[call.id].key_use
    try:
        try:
            reply = await c.gw.fair_share.submit(
                s.token.backend, c.identity.key, call.id, bargs, c)
        except BaseException:
            if s.raw_rsa_pending is not None:  # a raw RSA limit waits for this init
                key_types.started(s, False)
            raise
        if s.raw_rsa_pending is not None:
            key_types.started(s, True)
    except (BackendUnavailable, TimeoutError):
        # in flight when the backend died or hung; the session is gone with it
        if key_use:
            audit_key_use(c, call, args, ckr.DEVICE_ERROR)
        raise Pkcs11Error(ckr.DEVICE_ERROR) from None
    except Pkcs11Error as e:
        if key_use:
            audit_key_use(c, call, args, e.rv)
        raise
    if key_use:
        try:
            audit_key_use(c, call, args, ckr.OK)
        except AuditError:
            await fail_closed.undo_key_use(c, call, s, reply)
            raise
    if s.fenced:
        lift_fence(s, call.id)
    return translation.finish(c, call, s, private, reply)


def forward_now(c: ClientConnection, code: int, call: Call, args: list[Any], s: Session,
                plan: CallPlan) -> None:
    """The hot path: a plain session call with nothing queued before it on that
    session is sent to the backend at once, and answered from a done-callback —
    no task, no coroutine."""
    try:
        if not c.initialized:
            raise Pkcs11Error(ckr.CRYPTOKI_NOT_INITIALIZED)
        if call.id in key_separation.USE_CHECKED and key_separation.enabled(s.token):
            raise SlowPath  # the key's roles are read first (an await)
        s, bargs, private = translation.prepare(c, call, args, hot=True)
        if plan.relayable:
            raw = c.gw.fair_share.submit_raw(
                s.token.backend, c.identity.key, call.id, bargs)
            if raw is not None:
                s.tail = raw  # type: ignore[assignment]
                raw.add_done_callback(functools.partial(
                    relay, c, code, call, args if plan.key_use else None))
                return
        fut = c.gw.fair_share.submit(
            s.token.backend, c.identity.key, call.id, bargs, c)
    except (Stale, precedence.Unresolved, KeyTypeUnknown, WrongKeyType, EndsOperation,
            SlowPath):
        # an object handle from before a backend restart (find it again first), or the
        # module must be asked first (a refusal's precedence, a key's type), or a refused
        # call's operation must be ended there: on the slow path
        task = asyncio.get_running_loop().create_task(
            c._run(code, call, args, forward, None))
        s.tail = task
        c._tasks.add(task)
        task.add_done_callback(c._tasks.discard)
        return
    except Exception as e:
        # a fault of the gateway's own costs this call, never the connection
        c._reply(code, error_reply(c, call, e))
        return
    s.tail = fut  # type: ignore[assignment]

    def done(f: asyncio.Future[list[Any]]) -> None:
        try:
            values = translation.finish(c, call, s, private, f.result())
            body = encode_reply(call.id, values, c.dialect, args)
        except Exception as e:
            body = error_reply(c, call, e)
        if plan.key_use:
            try:
                audit_key_use(c, call, args, reply_rv(body))
            except AuditError as e:
                body = fail_closed.unaudited_reply(c, call, s, f, e)
        c._reply(code, body)

    fut.add_done_callback(done)


async def h_set_operation_state(c: ClientConnection, call: Call, args: list[Any]) -> list[Any]:
    """C_SetOperationState(session, state, encryption key, authentication key) starts an
    operation again, with those keys when given: a key use no Init records and that
    cannot be undone. It is audited before it runs (``PENDING``: an audit log that
    cannot take the record refuses it, fail closed), needs ``use`` when it names a key,
    as an Init does, and its result follows as a best-effort record."""
    s = c.session_for(args[0])
    t = s.token
    if any(args[2:4]):  # 0: no key
        c.require(t, "use", "key use")
    key = next((c.handles.objects.get(h) for h in args[2:4] if h), None)
    fields: dict[str, Any] = {"object": translation.object_fields_of(key) if key else {}}
    c.gw.audit.attempt(call.name, c.peer, t.name, **fields)
    try:
        reply = await forward(c, call, args)
    except Pkcs11Error as e:
        c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name, **fields)
        raise
    c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name, **fields)
    return reply

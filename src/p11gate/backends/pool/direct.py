"""The pool's direct path: a call that needs one member session for that one call and
nothing before or after it on the pool's side (``routes.DIRECT``: C_GenerateRandom,
C_GetAttributeValue, ...) is started at once, without a task or a coroutine, when
everything it needs is at hand: the best member has an idle session nobody queues for,
and that member's handles of the objects it names are known.

Anything else takes the general path (``PoolBackend.call``), which waits for a lease,
finds handles and fails over: the direct path is the same routing (same candidates,
same pinning, same handle checks) with the waiting left out. A member that fails under
a direct call (transport, deadline, device error) is marked down and the call goes on
through the general path on the other members, exactly as if it had started there.

Why: the general path costs a task and six coroutine frames per call, about as much
Python as everything else the gateway does for a C_GenerateRandom.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from ...codec import encode_reply, reply_rv
from ...codec.call_table import PLANS
from ...codec.tables import V026
from ...errors import BackendUnavailable, Pkcs11Error
from .member import ID, SESSION_GONE, Member, MemberDown
from .single_calls import single_call

if TYPE_CHECKING:
    from .pool import PoolBackend

#: PoolBackend.handle_known: the handle must be looked up on the member first
LOOK_UP = -1


def start_direct(pool: PoolBackend, call_id: int,
                 args: list[Any]) -> asyncio.Future[list[Any]] | None:
    """The call started on the best member, or None: take the general path."""
    return _start(pool, call_id, args, False)


def start_direct_raw(pool: PoolBackend, call_id: int,
                     args: list[Any]) -> asyncio.Future[bytes] | None:
    """:func:`start_direct` for a relayable call (``CallPlan.relayable``): the future
    gives the reply body to relay, or None: take another path."""
    return _start(pool, call_id, args, True)


def _start(pool: PoolBackend, call_id: int, args: list[Any],
           raw: bool) -> asyncio.Future[Any] | None:
    s = pool.sessions.get(args[0])
    if s is None:
        return None
    pinned = pool._session_pin(s, call_id, args)
    cands = pool._candidates(set(), pinned)
    if not cands:
        return None
    m = cands[0]
    margs = _handles_at_hand(pool, m, call_id, args)
    if margs is None:
        return None
    lease = m.lease_now()
    if lease is None:
        return None
    session, epoch = lease
    margs[0] = session
    out: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def then(reply: Any, e: BaseException | None) -> None:
        if e is None:
            if raw and reply_rv(reply) in SESSION_GONE:
                _drop(pool, m, session, epoch)  # replaced; the member stays up
            else:
                m.give_back(session, epoch)
            if not out.done():
                out.set_result(reply)
        elif isinstance(e, MemberDown):
            _drop(pool, m, session, epoch)
            _fail_over(pool, out, m, call_id, args, e, raw)
        elif isinstance(e, asyncio.CancelledError):
            m.give_back(session, epoch)  # as the general path's lease does
            if not out.done():
                out.cancel()
        else:
            if isinstance(e, Pkcs11Error) and e.rv in SESSION_GONE:
                _drop(pool, m, session, epoch)  # replaced; the member stays up
            else:
                m.give_back(session, epoch)
            if not out.done():
                out.set_exception(e)

    try:
        if raw:
            if not m.send_raw(call_id, margs, then):
                m.give_back(session, epoch)  # this back end relays nothing raw
                return None
        else:
            m.send(call_id, margs, then)
    except MemberDown as e:
        _drop(pool, m, session, epoch)
        _fail_over(pool, out, m, call_id, args, e, raw)
    return out


def _handles_at_hand(pool: PoolBackend, m: Member, call_id: int,
                     args: list[Any]) -> list[Any] | None:
    """``args`` with object ids replaced by ``m``'s handles, if all are known now."""
    margs = list(args)
    for p in PLANS[call_id].object_args:
        oid = margs[p]
        if oid == 0:  # CK_INVALID_HANDLE: the module answers it (as PoolBackend.translate)
            continue
        try:
            h = pool.handle_known(m, oid)
        except Pkcs11Error:
            return None  # the general path gives the error
        if h is None or h == LOOK_UP:
            return None
        margs[p] = h
    return margs


def _drop(pool: PoolBackend, m: Member, session: int, epoch: int) -> None:
    """A broken member session: out of the pool's lease, closed on the module."""
    if m.give_back(session, epoch, broken=True):
        task = asyncio.get_running_loop().create_task(_close(m, session))
        pool._background.add(task)
        task.add_done_callback(pool._background.discard)


async def _close(m: Member, session: int) -> None:
    with contextlib.suppress(Exception):
        await m.backend.call(ID["C_CloseSession"], [session])


def _fail_over(pool: PoolBackend, out: asyncio.Future[Any], m: Member, call_id: int,
               args: list[Any], e: MemberDown, raw: bool) -> None:
    """``m`` failed the call: on to the others by the general path (one failure made,
    perhaps a missed deadline: see member.deadline_strike). A relayed call's values are
    encoded as its reply body: relayable replies are encoded alike in every dialect
    (``CallPlan.relayable``)."""
    pool._failed_over(m, call_id, str(e))
    if pool.cfg.max_attempts <= 1:
        out.set_exception(BackendUnavailable(f"pool {pool.name}: failed on 1 members"))
        return
    task = asyncio.get_running_loop().create_task(single_call(
        pool, call_id, args, {m.index}, pool.sessions.get(args[0]), failures=1,
        deadline_missed=e.deadline))
    pool._background.add(task)

    def copy(t: asyncio.Task[list[Any]]) -> None:
        pool._background.discard(t)
        if out.done():
            return
        if t.cancelled():
            out.cancel()
        elif (e := t.exception()) is not None:
            out.set_exception(e)
        elif raw:
            out.set_result(encode_reply(call_id, t.result(), V026))
        else:
            out.set_result(t.result())

    task.add_done_callback(copy)

"""A pool's single calls: a call that is no operation's and no pool-wide call (object
management, attribute reads and writes, key generation, ...) runs on the best member,
on a session leased for that one call, and fails over to the next-best member when
its member fails for a member-level reason (transport, deadline, device error).

Why a module of its own: this is the general path (the direct path, direct.py, falls
back to it), and the place where what a call made is followed up: new objects get pool
ids, creations are replicated to the other members (replication = "gateway"), and a
session's session objects tie it to their member.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec.call_table import PLANS
from ...errors import BackendUnavailable, Pkcs11Error
from .identities import after_call
from .member import Member
from .member_rules import SESSION_GONE, MemberDown, deadline_strike
from .reconcile import CREATING
from .replication import DETERMINISTIC, EVERYWHERE, GENERATED
from .session_objects import call_on_control
from .session_rules import CREATE_TEMPLATES, new_objects_on_token

if TYPE_CHECKING:
    from .pool import PoolBackend, _Session


async def single(pool: PoolBackend, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
    if pool.reconciler is not None and call_id in CREATING:
        return await pool.reconciler.run(
            call_id, args, lambda avoid: single_call(pool, call_id, args, avoid, s))
    return await single_call(pool, call_id, args, set(), s)


async def single_call(pool: PoolBackend, call_id: int, args: list[Any], avoid: set[int],
                      s: _Session | None = None, failures: int = 0,
                      deadline_missed: bool = False) -> list[Any]:
    """One call on the best member, failing over; never on members in ``avoid``.
    ``failures``: members it already failed on (the direct path's);
    ``deadline_missed``: whether one of them was a missed deadline (a second is not
    retried, see member.deadline_strike)."""
    pinned = pool._session_pin(s, call_id, args)
    # a session object is made on the member's control session (see session_objects)
    on_control = call_id in CREATE_TEMPLATES and not all(
        new_objects_on_token(call_id, args, pool._is_token_object(call_id, args)))
    tried: set[int] = set(avoid)
    lacking = False
    while True:
        cands = pool._candidates(tried, pinned)
        if not cands:
            break
        m = cands[0]
        tried.add(m.index)
        try:
            margs = await pool.translate(m, call_id, args)
            if margs is None:
                lacking = True
                continue
            if on_control:
                reply = await call_on_control(m, call_id, margs)
            else:
                reply = await _leased_call(m, call_id, margs)
            reply = await after_call(pool, m, call_id, args, reply)
        except MemberDown as e:
            pool._failed_over(m, call_id, str(e))
            deadline_missed = deadline_strike(e, deadline_missed)
            failures += 1
            if failures >= pool.cfg.max_attempts:
                raise BackendUnavailable(
                    f"pool {pool.name}: failed on {failures} members") from None
            continue
        if pool.replicator is not None:
            await _replicate(pool, m, call_id, args, reply)
        if s is not None and call_id in CREATE_TEMPLATES:
            _own_session_objects(pool, s, m, call_id, reply)
        return reply
    if lacking and pinned is not None and pool.members[pinned].usable:
        # the objects it names live on two members: no member can run it
        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID, "objects on two members")
    raise pool._unavailable(pinned, lacking, "the object", pool._oids_in(call_id, args))


async def _leased_call(m: Member, call_id: int, margs: list[Any]) -> list[Any]:
    sess, epoch = await m.lease()
    broken = False
    try:
        margs[0] = sess
        return await m.call(call_id, margs)
    except MemberDown:
        broken = True
        raise
    except Pkcs11Error as e:
        broken = e.rv in SESSION_GONE  # replaced, the member stays up
        raise
    finally:
        await m.release(sess, epoch, broken)


def _own_session_objects(pool: PoolBackend, s: _Session, m: Member, call_id: int,
                         reply: list[Any]) -> None:
    """Session objects a session made die with it, and tie it to their member."""
    for p in PLANS[call_id].new_objects:
        if p < len(reply) and reply[p] in pool.objects.sessions:
            s.objects.add(reply[p])
            s.pin = m.index


async def _replicate(pool: PoolBackend, m: Member, call_id: int, args: list[Any],
                     reply: list[Any]) -> None:
    assert pool.replicator is not None
    if call_id in DETERMINISTIC or call_id in GENERATED:
        new = PLANS[call_id].new_objects
        oids = [reply[p] for p in new if p < len(reply)]
        await pool.replicator.created(m, call_id, args, oids)
    elif call_id in EVERYWHERE:
        await pool.replicator.everywhere(m, call_id, args)

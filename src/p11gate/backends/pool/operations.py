"""A pool's operations: an ``*Init`` call, its Update calls and its final call run on one
leased member session, chosen when the operation starts.

Why a module of its own: an operation is the one thing a pool keeps between calls. Its
Update data is kept (up to ``replay_buffer``) so that when its member fails mid-way the
operation is begun again on another member and its Updates replayed there, invisibly to
the client; past the buffer it can no longer move and the failure is the client's. A
context-specific login (CKU_CONTEXT_SPECIFIC) belongs to the operation and is replayed
with it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ...codec import Null, ckr
from ...codec import constants as ck
from ...errors import BackendUnavailable, Pkcs11Error
from .member import Member
from .member_rules import ID, MemberDown, deadline_strike
from .routes import ENDERS, MESSAGE_INITS, UPDATES
from .session_rules import keeps_operation

if TYPE_CHECKING:
    from .pool import PoolBackend, _Session

log = logging.getLogger("p11gate.pool")

#: bytes a kept Update part counts against replay_buffer besides its data (its list,
#: tuple and slot in the gateway's memory): empty or tiny parts cannot pile up unbounded
_KEPT_PART_COST = 64


class _Op:
    __slots__ = ("args", "buffered", "busy", "call_id", "context_pin", "deadline_missed",
                 "epoch", "lost", "member", "replayable", "session", "updates", "used")

    def __init__(self, call_id: int, args: list[Any], replayable: bool) -> None:
        self.call_id = call_id
        self.args = args
        self.member = -1
        self.session = 0
        self.epoch = 0
        self.updates: list[tuple[int, list[Any]]] = []
        self.buffered = 0
        self.replayable = replayable
        #: a context-specific login (CKA_ALWAYS_AUTHENTICATE) made for this operation:
        #: replayed with it on failover, gone with it
        self.context_pin: bytes | None = None
        #: calls of this operation under way: while any is, its session is not taken back
        self.busy = 0
        #: when it last ran a call (monotonic): idle the longest, taken back first
        self.used = 0.0
        #: its session was taken back while it could not be replayed (take_back)
        self.lost = False
        #: one of its calls (or replays) missed its deadline on a member already: a
        #: second is not retried (member.deadline_strike)
        self.deadline_missed = False


async def start_op(pool: PoolBackend, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
    if s.op is not None or s.find is not None:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    op = _Op(call_id, args, replayable=call_id not in MESSAGE_INITS)
    await _begin(pool, op, set(), pool._session_pin(s, call_id, args))
    s.op = op
    return []


async def _begin(pool: PoolBackend, op: _Op, tried: set[int], pinned: int | None) -> None:
    """Lease a session on the best member and run the operation's Init there, then
    replay its Update calls; on a member failure, the next member."""
    lacking = False
    while True:
        cands = pool._candidates(tried, pinned)
        if not cands:
            raise pool._unavailable(pinned, lacking, "the key",
                                    pool._oids_in(op.call_id, op.args))
        m = cands[0]
        tried.add(m.index)
        try:
            margs = await pool.translate(m, op.call_id, op.args)
            if margs is None:
                lacking = True
                continue
            sess, epoch = await m.lease()
        except MemberDown as e:
            pool._failed_over(m, op.call_id, str(e))
            op.deadline_missed = deadline_strike(e, op.deadline_missed)
            continue
        try:
            margs[0] = sess
            await m.call(op.call_id, margs)
            if op.context_pin is not None:
                await m.call(ID["C_Login"], [sess, ck.CKU_CONTEXT_SPECIFIC, op.context_pin])
            for cid, uargs in op.updates:
                uargs2 = await pool.translate(m, cid, uargs)
                if uargs2 is None:
                    raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
                uargs2[0] = sess
                await m.call(cid, uargs2)
        except MemberDown as e:
            await m.release(sess, epoch, broken=True)
            pool._failed_over(m, op.call_id, str(e))
            op.deadline_missed = deadline_strike(e, op.deadline_missed)
            if len(tried) >= pool.cfg.max_attempts:
                raise BackendUnavailable(
                    f"pool {pool.name}: operation failed on {len(tried)} members"
                ) from None
            continue
        except BaseException:
            await m.release(sess, epoch,
                            broken=bool(op.updates) or op.context_pin is not None)
            raise
        op.member, op.session, op.epoch = m.index, sess, epoch
        op.used = time.monotonic()
        m.held[sess] = op  # between its calls, others may take it back (take_back)
        return


async def continue_op(pool: PoolBackend, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
    op = s.op
    assert op is not None
    op.busy += 1
    try:
        await _resume(pool, s, op)
        return await _continue(pool, s, op, call_id, args)
    finally:
        op.busy -= 1
        op.used = time.monotonic()


async def _resume(pool: PoolBackend, s: _Session, op: _Op) -> None:
    """An operation whose session was taken back (take_back) gets one again: begun
    again and replayed on the best member, or, when it could not be replayed, ended
    with CKR_DEVICE_ERROR (as a member failure beyond replay_buffer)."""
    if op.lost:
        s.op = None
        raise Pkcs11Error(ckr.DEVICE_ERROR, "operation idle while others waited for its "
                                            "member session; beyond replay_buffer")
    if op.member < 0:
        try:
            await _begin(pool, op, set(), pool._pinned_member(op.call_id, op.args))
        except BaseException:
            s.op = None
            raise


async def _continue(pool: PoolBackend, s: _Session, op: _Op, call_id: int,
                    args: list[Any]) -> list[Any]:
    while True:
        m = pool.members[op.member]
        try:
            margs = await pool.translate(m, call_id, args)
            if margs is None:
                # C_DigestKey of a key on another member: the operation moves there
                # (replayed) when it can, else it cannot be served
                there = pool._pinned_member(call_id, args)
                if there is None or not op.replayable or not pool.members[there].usable:
                    # PKCS#11: the error ends it; its Init is still on the session
                    await end_op(pool, s, broken=True)
                    raise Pkcs11Error(ckr.KEY_HANDLE_INVALID, "key on another member")
                _let_go(m, op)
                await m.release(op.session, op.epoch, broken=True)
                try:
                    await _begin(pool, op, set(), there)
                except BaseException:
                    s.op = None
                    raise
                continue
            margs[0] = op.session
            if op.epoch != m.epoch:
                raise MemberDown("member restarted")
            reply = await m.call(call_id, margs)
            break
        except MemberDown as e:
            _let_go(m, op)
            await m.release(op.session, op.epoch, broken=True)
            pool._failed_over(m, call_id, str(e))
            try:
                op.deadline_missed = deadline_strike(e, op.deadline_missed)
            except Pkcs11Error:
                s.op = None
                raise
            if not op.replayable:
                s.op = None
                raise Pkcs11Error(
                    ckr.DEVICE_ERROR, "member failed; operation data beyond replay_buffer"
                ) from None
            pool.replays += 1
            m.replays += 1
            try:
                await _begin(pool, op, {op.member}, pool._pinned_member(op.call_id, op.args))
            except BaseException:
                s.op = None
                raise
        except Pkcs11Error as e:
            if s.op is op and keeps_operation(call_id, e.rv):
                raise  # the operation goes on (an output-size answer; a bad key handle)
            # PKCS#11: an error ends the operation; a module may still keep it on the
            # member session (SoftHSM after CKR_KEY_INDIGESTIBLE), so that session
            # is closed and replaced rather than leased to another client mid-way
            if s.op is op:
                await end_op(pool, s, broken=True)
            raise
    if call_id in UPDATES:
        _remember_update(pool, op, call_id, args)
    elif call_id in ENDERS and not (reply and isinstance(reply[0], Null)):
        await end_op(pool, s)
    return reply


async def context_login(pool: PoolBackend, s: _Session, args: list[Any]) -> list[Any]:
    """CKU_CONTEXT_SPECIFIC: on the member session that holds the operation."""
    op = s.op
    if op is None:
        raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
    pin = bytes(args[2]) if isinstance(args[2], bytes) else b""
    op.busy += 1
    try:
        await _resume(pool, s, op)
        return await _context_login(pool, s, op, pin)
    finally:
        op.busy -= 1
        op.used = time.monotonic()


async def _context_login(pool: PoolBackend, s: _Session, op: _Op, pin: bytes) -> list[Any]:
    m = pool.members[op.member]
    try:
        if op.epoch != m.epoch:
            raise MemberDown("member restarted")
        await m.call(ID["C_Login"], [op.session, ck.CKU_CONTEXT_SPECIFIC, pin])
    except MemberDown as e:
        _let_go(m, op)
        await m.release(op.session, op.epoch, broken=True)
        pool._failed_over(m, ID["C_Login"], str(e))
        try:
            op.deadline_missed = deadline_strike(e, op.deadline_missed)
        except Pkcs11Error:
            s.op = None
            raise
        op.context_pin = pin  # replayed after the Init on the next member
        try:
            await _begin(pool, op, {op.member}, pool._pinned_member(op.call_id, op.args))
        except BaseException:
            s.op = None
            raise
        return []
    op.context_pin = pin  # for a replay; gone with the operation
    return []


def _remember_update(pool: PoolBackend, op: _Op, call_id: int, args: list[Any]) -> None:
    if not op.replayable:
        return
    # what keeping the part costs, not only its data: empty parts are not free
    size = (len(args[1]) if isinstance(args[1], bytes) else 8) + _KEPT_PART_COST
    op.buffered += size
    if op.buffered > pool.cfg.replay_buffer:
        op.replayable = False
        op.updates.clear()  # no longer useful: free it
        return
    op.updates.append((call_id, list(args)))


async def end_op(pool: PoolBackend, s: _Session, broken: bool = False) -> None:
    op, s.op = s.op, None
    if op is not None and op.member >= 0:
        m = pool.members[op.member]
        _let_go(m, op)
        op.member = -1
        await m.release(op.session, op.epoch, broken)


def _let_go(m: Member, op: _Op) -> None:
    """``op`` no longer holds its session on ``m`` (it releases it)."""
    if m.held.get(op.session) is op:
        del m.held[op.session]


def take_back(m: Member) -> tuple[int, int] | None:
    """A session of ``m`` taken back from an operation that sits idle on it (no call
    under way), for a caller that found none free: (session, epoch) to close, or None.

    Replayable operations go first, idle the longest first: parked, begun again and
    replayed on whichever member has room at their next call, invisibly to their
    client. Operations that cannot be replayed (past replay_buffer, message-based) go
    only when no replayable one is idle; they end (CKR_DEVICE_ERROR at their next call,
    as when their member fails). So a client that starts operations and leaves them
    holds no session another client waits for."""
    idle = [op for op in m.held.values() if not op.busy and op.epoch == m.epoch]
    if not idle:
        return None
    op: _Op = min(idle, key=lambda o: (not o.replayable, o.used))
    session, epoch = op.session, op.epoch
    del m.held[session]
    op.member = -1
    op.lost = not op.replayable
    if op.lost:
        log.warning("pool operation ended: its member session was taken back while it "
                    "sat idle past replay_buffer", extra={"member": m.name})
    return session, epoch

"""A pool's calls that are no one session's: slot and token queries, answered by any usable
member, and the calls every member must see -- C_Login/C_LoginUser, C_Logout, C_InitPIN
and C_SetPIN.

Why a module of its own: these calls do not lease a member session and do not fail over
the way session calls do. A query moves on to the next member when a member's module
breaks down in it (see ``member.BROKE_DOWN``); a login must reach every member, and a
member that refuses the PIN the others took is not equivalent to them and is marked
down. The pool keeps the login for members that join later (see probing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec.call_table import PLANS
from ...errors import BackendUnavailable, Pkcs11Error
from .member import Member
from .member_rules import BROKE_DOWN, BROKE_DOWN_ATTEMPTS, BROKE_DOWN_PAUSE, ID, MemberDown

if TYPE_CHECKING:
    from .pool import PoolBackend

log = logging.getLogger("p11gate.pool")


async def any_member(pool: PoolBackend, call_id: int, args: list[Any]) -> list[Any]:
    """A slot or token query on the best usable member. A member whose module broke
    down in it (see BROKE_DOWN) is passed over for the next; when all of them did,
    they are asked again after a short pause, up to BROKE_DOWN_ATTEMPTS rounds, and
    the module's error is the answer after the last. Any other error is the answer
    at once (a query names only the slot and a mechanism: it is the module's)."""
    broke: Pkcs11Error | None = None
    for attempt in range(1, BROKE_DOWN_ATTEMPTS + 1):
        for m in pool._candidates(set(), None):
            try:
                return await m.call(call_id, [m.slot, *args[1:]])
            except MemberDown:
                continue
            except Pkcs11Error as e:
                if e.rv not in BROKE_DOWN:
                    raise
                broke = e
                log.warning("slot query failed in a member's module; asked elsewhere "
                            "or again", extra={"pool": pool.name, "member": m.name,
                                               "attempt": attempt,
                                               "call": PLANS[call_id].call.name,
                                               "error": ckr.name(e.rv)})
        if broke is None:
            break  # no member up: nothing to ask again
        if attempt < BROKE_DOWN_ATTEMPTS:
            await asyncio.sleep(random.uniform(0.0, BROKE_DOWN_PAUSE))
    if broke is not None:
        raise broke
    raise BackendUnavailable(f"pool {pool.name}: no member up")


async def login_all(pool: PoolBackend, call_id: int, args: list[Any]) -> list[Any]:
    ok, errors = 0, []
    for m in pool.members:
        if not m.usable:
            continue
        try:
            await _login_member(pool, m, call_id, args)
            ok += 1
        except MemberDown:
            continue
        except Pkcs11Error as e:
            if e.rv == ckr.USER_ALREADY_LOGGED_IN:
                ok += 1
            else:
                errors.append((m, e))
    if ok == 0:
        if errors:
            raise errors[0][1]
        raise BackendUnavailable(f"pool {pool.name}: no member up")
    for m, err in errors:
        # the others took this PIN: this member is not equivalent
        m.mark_down(f"login refused: {ckr.name(err.rv)}")
    if call_id == ID["C_Login"] and isinstance(args[2], bytes):
        pool._login = (args[1], bytes(args[2]))  # for members that join later
    if pool.reconciler is not None and pool.logged_in:
        await pool.reconciler.reconcile_all()  # private objects are in sight now
    return []


async def _login_member(pool: PoolBackend, m: Member, call_id: int, args: list[Any]) -> None:
    """The client's C_Login (or C_LoginUser) on member ``m``'s control session; again,
    after a short pause, when its module broke down in it (see BROKE_DOWN: SoftHSM
    fails so before it checks the PIN, so a retry counts no wrong PIN), up to
    BROKE_DOWN_ATTEMPTS times. Any other error, or the last one, is raised: the
    caller then treats the member as refusing the PIN, as before."""
    for attempt in range(1, BROKE_DOWN_ATTEMPTS + 1):
        try:
            await m.call(call_id, [m.control, *args[1:]])
            return
        except Pkcs11Error as e:
            if e.rv not in BROKE_DOWN or attempt == BROKE_DOWN_ATTEMPTS:
                raise
            log.warning("login failed in a member's module; tried again",
                        extra={"pool": pool.name, "member": m.name, "attempt": attempt,
                               "error": ckr.name(e.rv)})
        await asyncio.sleep(random.uniform(0.0, BROKE_DOWN_PAUSE))


async def logout_all(pool: PoolBackend) -> list[Any]:
    pool._forget_pin()
    for m in pool.members:
        if m.usable:
            with contextlib.suppress(Pkcs11Error, MemberDown):
                await m.call(ID["C_Logout"], [m.control])
    return []


async def on_every_member(pool: PoolBackend, call_id: int, args: list[Any]) -> list[Any]:
    done = 0
    for m in pool.members:
        if not m.usable:
            continue
        try:
            sess, epoch = await m.lease()
        except MemberDown:
            continue
        try:
            await m.call(call_id, [sess, *args[1:]])
            done += 1
        except MemberDown:
            pass
        finally:
            await m.release(sess, epoch)
    if not done:
        raise BackendUnavailable(f"pool {pool.name}: no member up")
    return []

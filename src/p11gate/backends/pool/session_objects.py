"""Session objects made through a pool.

A member session serves many logical sessions one after another, and is closed and
replaced when an operation may be left on it. So that a session object lives exactly as
long as the logical session that made it (PKCS#11: it goes when its session closes),
it is made on the member's control session, which lives as long as the member's
instance, and destroyed by the pool when the logical session closes.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ...errors import Pkcs11Error
from .member import ID, Member, MemberDown

if TYPE_CHECKING:
    from .pool import PoolBackend


async def call_on_control(m: Member, call_id: int, margs: list[Any]) -> list[Any]:
    """``call_id`` on ``m``'s control session (serialized with the pool's own searches)."""
    async with m.control_lock:
        margs[0] = m.control
        return await m.call(call_id, margs)


async def destroy_session_objects(pool: PoolBackend, oids: set[int]) -> None:
    """Destroy the session objects ``oids`` (their logical session closed). Those whose
    member instance is gone died with it."""
    for oid in sorted(oids):
        so = pool.objects.sessions.pop(oid, None)
        if so is None:
            continue  # destroyed by the client already
        m = pool.members[so.member]
        m.oids.pop(so.handle, None)
        if m.usable and m.epoch == so.epoch:
            with contextlib.suppress(Pkcs11Error, MemberDown):
                await call_on_control(m, ID["C_DestroyObject"], [0, so.handle])
    oids.clear()

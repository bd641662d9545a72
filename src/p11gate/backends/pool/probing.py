"""A pool's probe loop: every ``probe_interval`` each member is looked at; a member whose
back end restarted or went down is marked down, and a member that is down but whose back
end is up again is attached (logged in if the pool is), reconciled and caught up before
it serves anything. The loop also takes over orphaned creations and logs the pool's
figures every ``stats_interval``.

Why a module of its own: this is the pool's only work that no client call starts; it runs
as a task of its own from ``PoolBackend.start`` to ``PoolBackend.stop``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ...errors import Pkcs11Error
from .member import MemberDown
from .reconcile import TAKE_OVER_INTERVAL

if TYPE_CHECKING:
    from .pool import PoolBackend

log = logging.getLogger("p11gate.pool")


async def probe_loop(pool: PoolBackend) -> None:
    loop = asyncio.get_running_loop()
    next_stats = loop.time() + pool.cfg.stats_interval
    next_take_over = loop.time() + TAKE_OVER_INTERVAL
    while True:
        await asyncio.sleep(pool.cfg.probe_interval)
        try:
            await probe_once(pool)
            if pool.reconciler is not None and loop.time() >= next_take_over:
                next_take_over = loop.time() + TAKE_OVER_INTERVAL
                await pool.reconciler.take_over_orphaned()
        except Exception:
            log.exception("pool probe failed", extra={"pool": pool.name})
        if pool.cfg.stats_interval and loop.time() >= next_stats:
            next_stats = loop.time() + pool.cfg.stats_interval
            pool.log_stats()


async def probe_once(pool: PoolBackend) -> None:
    for m in pool.members:
        if m.state == "up" and not m.usable:
            m.mark_down("backend restarted" if m.backend.up else "backend down")
        if m.state == "down" and m.backend.up:
            try:
                await asyncio.wait_for(m.attach(pool._login), 10.0)
            except (Pkcs11Error, TimeoutError) as e:
                m.down_reason = str(e) or e.__class__.__name__
                continue
            log.info("pool member up", extra={"pool": pool.name, "member": m.name})
            if pool.reconciler is not None:
                await pool.reconciler.reconcile(m)  # before it serves anything
            if pool.replicator is not None:
                try:
                    await pool.replicator.catch_up(m)
                except (Pkcs11Error, MemberDown) as e:
                    log.warning("catch-up failed", extra={"member": m.name,
                                                          "error": str(e)})

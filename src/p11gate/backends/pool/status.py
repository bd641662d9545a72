"""What a pool reports about itself: the `status` figures (``PoolBackend.describe``) and
the periodic "pool stats" log record.

Why a module of its own: reporting reads the pool's state -- members, logical sessions,
object ids, pinned objects -- and changes nothing; kept apart, the routing code does not
carry the shape of a status answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import PoolBackend

log = logging.getLogger("p11gate.pool")


def log_stats(pool: PoolBackend) -> None:
    """One log record with each member's state and load (the `status` figures)."""
    log.info("pool stats", extra={
        "pool": pool.name, "failovers": pool.failovers, "replays": pool.replays,
        "logical_sessions": len(pool.sessions),
        "members": {m.name: m.describe() for m in pool.members}})


def describe(pool: PoolBackend) -> dict[str, Any]:
    return {
        "name": pool.name, "kind": "pool", "up": pool.up, "generation": pool.generation,
        "replication": pool.cfg.replication, "failovers": pool.failovers,
        "replays": pool.replays, "objects": len(pool.objects),
        **(pool.reconciler.describe() if pool.reconciler is not None else {}),
        "logical_sessions": len(pool.sessions),
        "operations_active": sum(1 for s in pool.sessions.values() if s.op is not None),
        "members": [{**m.describe(), "stale_objects": pool.objects.stale_count(m.name)}
                    for m in pool.members],
        "pinned_objects": [
            {"class": pool.objects.by_oid[o][0], "id": _text(pool.objects.by_oid[o][1], True),
             "label": _text(pool.objects.by_oid[o][2]),
             "member": name, "member_state": pool._member_named(name)}
            for o, name in pool.objects.pinned.items()
            if o in pool.objects.by_oid and o not in pool.objects.destroyed],
        "made_through_pool": [
            {"label": _text(pool.objects.by_oid[o][2]),
             "class": pool.objects.by_oid[o][0], "origin": origin,
             "pinned": o in pool.objects.pinned}
            for o, origin in list(pool.objects.origin.items())[-100:]
            if o in pool.objects.by_oid and o not in pool.objects.destroyed],
    }


def _text(b: bytes | None, hexa: bool = False) -> str | None:
    if b is None:
        return None
    return b.hex() if hexa else b.decode("utf-8", "replace")

"""Connections and sessions per identity counted across every process and node on a
shared state store, so that ``max_connections_per_identity`` and
``max_sessions_per_identity`` hold for the whole deployment, not per process (an
identity must not get N times its quota from N processes or nodes).

Each gateway process is one *holder* (host and state directory): a row per identity in
``identity_usage`` with its own counts and a lease (``until``), and a row in
``gateway_lease`` saying it is alive (pool intents it owns are left to it). Taking a
connection or a session reads what the other holders with a live lease have and writes
this holder's new count, in one transaction under a lock named after the identity: two
processes cannot both take the last place. Counts going down are written when a
connection ends and by the heartbeat (every ``HEARTBEAT`` s, which also renews the
lease); until then the others see the higher count, which errs on the side of fewer
places. A process that dies stops renewing: its rows no longer count ``LEASE`` s after
its last heartbeat.

A store that cannot be read or written does not stop new connections (the store may be
a remote database; quotas protect resources, they are not a credential): the per-process
limit, always checked first, still applies, and the failure is logged. After a failure
the store is left alone for ``RETRY`` s (the heartbeat tries it again), so that a store
that hangs costs the event loop one timeout per ``RETRY`` s, not one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

from ..state.base import StateStore, StoreError
from .limits import limited_log

#: seconds between renewals of this holder's leases (and publications of its counts)
HEARTBEAT = 5.0
#: seconds a holder's counts still count after its last renewal
LEASE = 30.0
#: seconds after a store failure during which takes count in this process only
RETRY = HEARTBEAT

_OTHERS = ("SELECT COALESCE(SUM(connections), 0), COALESCE(SUM(sessions), 0) "
           "FROM identity_usage WHERE who = ? AND holder <> ? AND until >= ?")
_UPSERT = ("INSERT INTO identity_usage (holder, who, connections, sessions, until) "
           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (holder, who) DO UPDATE SET "
           "connections = excluded.connections, sessions = excluded.sessions, "
           "until = excluded.until")


def _stored(who: str) -> str:
    """PostgreSQL text has no NUL (see pin_throttle)."""
    return who.replace("\x00", "\\x00")


_LEASE = ("INSERT INTO gateway_lease (holder, until) VALUES (?, ?) ON CONFLICT (holder) "
          "DO UPDATE SET until = excluded.until")


class SharedUsage:
    def __init__(self, store: StateStore, holder: str = "") -> None:
        self.store = store
        #: this process (the store's holder: host and state directory, the same after a
        #: restart, so that a restarted process replaces its rows at once)
        self.holder = holder or store.holder or f"{socket.gethostname()}/{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        #: store failures seen (status)
        self.failures = 0
        #: monotonic time until which the store is not asked (after a failure)
        self._down_until = 0.0

    def take(self, who: str, what: str, mine: tuple[int, int], limit: int) -> bool:
        """Whether ``who`` may have one more ``what`` ("connections" or "sessions")
        given this process's counts ``mine`` (connections, sessions) before it, and
        ``limit`` for the whole store; on yes, this holder's row carries the new count."""
        conns, sess = mine
        if time.monotonic() < self._down_until:
            return True  # the store failed a moment ago: the local limit only
        now = time.time()
        try:
            with self.store.transaction() as t:
                t.lock(f"identity_usage:{_stored(who)}")  # no NUL in PostgreSQL text
                ((other_conns, other_sess),) = t.query(_OTHERS, (_stored(who), self.holder,
                                                                 now))
                have = (int(other_conns) + conns if what == "connections"
                        else int(other_sess) + sess)
                if have >= limit:
                    return False
                if what == "connections":
                    conns += 1
                else:
                    sess += 1
                t.execute(_UPSERT, (self.holder, _stored(who), conns, sess, now + LEASE))
        except StoreError as e:
            self._failed(e)
        return True

    def publish(self, who: str, mine: tuple[int, int]) -> None:
        """This holder's counts for ``who`` now (best effort: the heartbeat repeats)."""
        if time.monotonic() < self._down_until:
            return
        try:
            self._write(who, mine, time.time())
        except StoreError as e:
            self._failed(e)

    def _write(self, who: str, mine: tuple[int, int], now: float) -> None:
        if mine == (0, 0):
            self.store.execute("DELETE FROM identity_usage WHERE holder = ? AND who = ?",
                               (self.holder, _stored(who)))
        else:
            self.store.execute(_UPSERT, (self.holder, _stored(who), mine[0], mine[1],
                                         now + LEASE))

    def renew(self, counts: dict[str, tuple[int, int]]) -> None:
        """The heartbeat: every identity this holder has rows or counts for, written
        again with a new lease; expired rows of dead holders cleared."""
        now = time.time()
        try:
            rows = self.store.query("SELECT who FROM identity_usage WHERE holder = ?",
                                    (self.holder,))
            stored = {str(r[0]) for r in rows}
            for who, mine in counts.items():
                stored.discard(_stored(who))
                self._write(who, mine, now)
            for who in stored:  # counted before, nothing now
                self.store.execute("DELETE FROM identity_usage WHERE holder = ? AND who = ?",
                                   (self.holder, who))
            self.store.execute("DELETE FROM identity_usage WHERE until < ?", (now - LEASE,))
            # alive: the pool intents it owns are its own to settle (pool/intents.py)
            self.store.execute(_LEASE, (self.holder, now + LEASE))
        except StoreError as e:
            self._failed(e)
        else:
            self._down_until = 0.0  # the store answers again

    def start(self, counts: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """Renew now (rows of this holder's previous run are replaced) and every
        HEARTBEAT s with this process's ``counts()``."""
        self.renew(counts())

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT)
                self.renew(counts())

        self._task = asyncio.get_running_loop().create_task(beat())

    def stop(self) -> None:
        """Stop renewing and drop this holder's rows (best effort: a process that cannot
        reach the store lets them expire)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with contextlib.suppress(StoreError):
            self.store.execute("DELETE FROM identity_usage WHERE holder = ?", (self.holder,))
            self.store.execute("DELETE FROM gateway_lease WHERE holder = ?", (self.holder,))

    def _failed(self, e: StoreError) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + RETRY
        limited_log.warning("per-identity quotas counted in this process only: the state "
                            "store cannot be used", error=e.reason, where=e.where)

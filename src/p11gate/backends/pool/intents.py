"""Creation intents: what a gateway-replicated pool is about to create, recorded first.

A creation through a pool with gateway replication runs on several members, one after
the other (generate on one, copy to the others). A gateway killed half-way leaves
objects on some members that no client was told about. So before the first member is
asked, the pool records an *intent*: the identities (CKA_CLASS, CKA_ID, CKA_LABEL) it is
about to create and the members that may end up holding them (all of them). The row is
dropped when the client's reply is ready (done), or kept, naming the members still to
clean, when the creation failed or some member's outcome is unknown. On start, when a
member rejoins and when the pool is logged in, :mod:`.reconcile` destroys on those
members every object of those identities -- no client ever got a handle to them -- and
drops the member from the intent; an intent with no member left is removed.

Rows: ``state`` is ``pending`` (written before the creation: a gateway that died with
it pending never answered), ``failed`` (the creation failed and was undone where it
could be) or ``done`` (the client was told; ``unsettled`` lists members whose part of
the creation failed mid-way, which hold no good copy and are cleaned when they return)
or ``fragment``: a module call failed in the middle of a creation on a member, which may
keep a half-made object with default attributes (no CKA_ID, no CKA_LABEL). SoftHSM does,
when concurrent writers make it fail with CKR_GENERAL_ERROR, and the process that made
it does not see it until it is restarted -- so such a row is only written, never acted on
in the process that wrote it: the next start destroys those fragments on that member
(unless the registry knows an object of that empty identity).
"""

from __future__ import annotations

import json
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from ...codec import ckr
from ...errors import Pkcs11Error
from ...state.base import StateStore
from .member import Member
from .objects import Key

FRAGMENT = "fragment"
CKO_DATA = 0
#: errors after which a module may have made part of an object: not the template and
#: argument errors it checks before it starts
MIDWAY_ERRORS = frozenset((ckr.GENERAL_ERROR, ckr.FUNCTION_FAILED, ckr.DEVICE_ERROR,
                           ckr.DEVICE_MEMORY))

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pool_intent (
        pool TEXT NOT NULL, intent INTEGER NOT NULL, state TEXT NOT NULL,
        objects TEXT NOT NULL, unsettled TEXT NOT NULL, created REAL NOT NULL,
        owner TEXT, PRIMARY KEY (pool, intent))""",
)
#: the intents this process may act on: its own (from before a restart), those of no
#: one (written before owners were), and those of processes whose lease ran out. Those
#: of a live process on the store are its own business: it may be creating them now.
_MINE_OR_ORPHANED = (
    "SELECT intent, state, objects, unsettled FROM pool_intent WHERE pool=? AND "
    "(owner IS NULL OR owner = ? OR owner NOT IN "
    "(SELECT holder FROM gateway_lease WHERE until >= ?))")
#: while running, on a shared store: the intents of other processes whose lease ran out
#: since (and ownerless ones). Fragment rows wait for a start: only a module process
#: started after the fragment was made is sure to see it (see above).
_ORPHANED_SINCE = (
    "SELECT intent, state, objects, unsettled FROM pool_intent WHERE pool=? AND "
    "state <> 'fragment' AND (owner IS NULL OR (owner <> ? AND owner NOT IN "
    "(SELECT holder FROM gateway_lease WHERE until >= ?)))")


class IdentityBusy(Pkcs11Error):
    """Another gateway process on the store is creating, or has made, one of these
    identities."""

    def __init__(self) -> None:
        super().__init__(ckr.ATTRIBUTE_VALUE_INVALID, "an object of this class, CKA_ID and "
                         "CKA_LABEL exists or is being created on the store")


#: an identity a pool creation made (its origin is set before the creation's intent is
#: dropped) and nobody destroyed since
_MADE = ("SELECT 1 FROM pool_object o JOIN pool_object_state s ON s.pool = o.pool AND "
         "s.oid = o.oid WHERE o.pool=? AND o.class=? AND o.id IS ? AND o.label IS ? AND "
         "o.uid IS ? AND s.origin IS NOT NULL AND s.destroyed = 0")
#: pending intents of other live processes on the store (see IntentLog.begin)
_OTHERS_PENDING = (
    "SELECT objects FROM pool_intent WHERE pool=? AND state='pending' AND owner IS NOT NULL "
    "AND owner <> ? AND owner IN (SELECT holder FROM gateway_lease WHERE until >= ?)")


@dataclass
class Intent:
    id: int
    keys: list[Key]
    #: members that may hold objects of these identities that no client was told about
    unsettled: set[str]
    state: str = "pending"
    #: in flight in this process: its own call cleans up, reconcile leaves it alone
    live: bool = True
    #: members whose part of the creation failed mid-way (outcome unknown): they are
    #: given no copy, and cleaned
    doubtful: set[str] = field(default_factory=set)
    #: members the creation must not use: still to be cleaned for one of these identities
    avoid: set[str] = field(default_factory=set)


def _encode_key(key: Key) -> list[int | str | None]:
    return [key[0], None if key[1] is None else key[1].hex(),
            None if key[2] is None else key[2].hex()]


def _decode_key(raw: list[int | str | None]) -> Key:
    cls, cid, label = raw
    return (int(cls or 0), None if cid is None else bytes.fromhex(str(cid)),
            None if label is None else bytes.fromhex(str(label)), None)


class IntentLog:
    def __init__(self, pool: str, registry: StateStore) -> None:
        self.pool = pool
        self.registry = registry
        registry.ensure(*_SCHEMA)
        #: intents not yet settled: in flight, or left by a failure or an earlier run
        self.open: dict[int, Intent] = {}
        self._load(_MINE_OR_ORPHANED)
        #: found at start: the figures the reconcile log line and status report
        self.found_at_start = sum(1 for it in self.open.values() if it.state != FRAGMENT)
        self.fragment_checks_at_start = len(self.open) - self.found_at_start

    def _load(self, query: str) -> list[Intent]:
        """Open the intents ``query`` finds that are not open yet; returns them."""
        found: list[Intent] = []
        for iid, state, objects, unsettled in self.registry.query(
                query, (self.pool, self.registry.holder, time.time())):
            if int(iid) in self.open:
                continue
            it = Intent(int(iid), [_decode_key(k) for k in json.loads(objects)],
                        set(json.loads(unsettled)), state=str(state), live=False)
            self.open[it.id] = it
            found.append(it)
        return found

    def take_over_orphaned(self) -> list[Intent]:
        """While running: the intents of a process or node on the store whose lease ran
        out after this process started (it died and has not come back), which at start
        were still a live process's business. Without this they waited for some
        gateway's next start. Only on a shared store: alone, every intent is this
        process's own and was loaded at start."""
        if not self.registry.shared:
            return []
        return self._load(_ORPHANED_SINCE)

    def _new_id(self) -> int:
        """A random id: processes and nodes on one store write intents at once, and a
        counter of their own would give two of them one row."""
        while (iid := secrets.randbits(62) + 1) in self.open:
            pass
        return iid

    def _row(self, it: Intent) -> tuple[object, ...]:
        return (self.pool, it.id, it.state, json.dumps([_encode_key(k) for k in it.keys]),
                json.dumps(sorted(it.unsettled)), time.time(), self.registry.holder or None)

    _UPSERT = ("INSERT OR REPLACE INTO pool_intent (pool, intent, state, objects, unsettled, "
               "created, owner) VALUES (?, ?, ?, ?, ?, ?, ?)")

    def _write(self, it: Intent) -> None:
        self.registry.execute(self._UPSERT, self._row(it))

    def _claim(self, it: Intent) -> None:
        """Write ``it`` unless another gateway on the store is creating, or has made,
        one of its identities (IdentityBusy): a live process's pending intent for it, or
        an object of it that a pool creation made (its origin recorded) and nobody
        destroyed. Checked and written in one transaction under the pool's lock, so of
        two gateways beginning the same identity at once exactly one goes on; and one
        that began earlier is seen either way: its intent is pending until its origin is
        recorded. The members' own check (reconcile.py) ran before, but cannot see a
        creation under way on another node."""
        wanted = set(it.keys)
        with self.registry.transaction() as t:
            t.lock(f"pool_intent:{self.pool}")
            for (objects,) in t.query(_OTHERS_PENDING, (self.pool, self.registry.holder,
                                                        time.time())):
                if wanted.intersection(_decode_key(k) for k in json.loads(objects)):
                    raise IdentityBusy()
            for key in it.keys:
                if t.query(_MADE, (self.pool, *key)):
                    raise IdentityBusy()
            t.execute(self._UPSERT, self._row(it))

    def _drop(self, it: Intent) -> None:
        self.registry.execute("DELETE FROM pool_intent WHERE pool=? AND intent=?",
                              (self.pool, it.id))
        self.open.pop(it.id, None)

    def suspect_fragments(self, member: str, classes: set[int]) -> None:
        """A module call failed mid-way through a creation on ``member``: recorded, so
        that the next start destroys what it may have left half made (see above)."""
        keys: list[Key] = [(c, None if c == CKO_DATA else b"", b"", None)
                           for c in sorted(classes)]
        if keys:
            self._write(Intent(self._new_id(), keys, {member}, state=FRAGMENT, live=False))

    def reserve(self, keys: list[Key], members: list[str]) -> Intent:
        """Claim ``keys`` for a creation in this process (not written yet: the call
        first checks that they are not on the pool already)."""
        it = Intent(self._new_id(), keys, set(members))
        it.avoid = self.unsettled_for(keys)
        self.open[it.id] = it
        return it

    def begin(self, it: Intent) -> None:
        """Record, durably, that ``it`` is about to be created (raises if the registry
        cannot be written: then nothing may be created)."""
        try:
            if self.registry.shared:  # other processes or nodes may create at once
                self._claim(it)
            else:
                self._write(it)
        except BaseException:
            self.open.pop(it.id, None)
            raise


    def done(self, it: Intent) -> None:
        """The client is told: only the members whose outcome is unknown stay to clean."""
        it.live = False
        it.state = "done"
        it.unsettled = set(it.doubtful)
        if it.unsettled:
            self._write(it)
        else:
            self._drop(it)

    def failed(self, it: Intent, members: set[str]) -> None:
        """The creation failed: ``members`` may hold a part of it until cleaned."""
        it.live = False
        it.state = "failed"
        it.unsettled = set(members)
        self._write(it)

    def settle(self, it: Intent, member: str) -> None:
        """``member`` holds nothing of ``it`` any more."""
        it.unsettled.discard(member)
        if it.unsettled:
            self._write(it)
        else:
            self._drop(it)

    def discard(self, it: Intent) -> None:
        """The creation was refused before any member was asked: nothing to clean."""
        it.live = False
        self.open.pop(it.id, None)

    def in_flight(self, keys: list[Key]) -> bool:
        wanted = set(keys)
        return any(it.live and wanted.intersection(it.keys) for it in self.open.values())

    def unsettled_for(self, keys: list[Key]) -> set[str]:
        """Members that still hold, or may hold, objects of ``keys`` no client knows."""
        wanted = set(keys)
        out: set[str] = set()
        for it in self.open.values():
            if not it.live and wanted.intersection(it.keys):
                out |= it.unsettled
        return out

    def unsettled_count(self) -> int:
        return sum(1 for it in self.open.values() if not it.live and it.state != FRAGMENT)


#: the intent of the creation this task is running (members that fail during it are
#: noted as doubtful: their part may or may not have been made)
CURRENT: ContextVar[Intent | None] = ContextVar("p11gate_pool_intent", default=None)


def note_doubtful(m: Member) -> None:
    """``m`` failed during the current creation: it gets no copy and is cleaned."""
    it = CURRENT.get()
    if it is not None:
        it.doubtful.add(m.name)
        it.avoid.add(m.name)


def avoided(m: Member) -> bool:
    """The current creation must not make anything on ``m``."""
    it = CURRENT.get()
    return it is not None and m.name in it.avoid

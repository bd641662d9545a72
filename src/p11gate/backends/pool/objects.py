"""Object identity across members.

A token object is known by (CKA_CLASS, CKA_ID, CKA_LABEL) -- or, in pools configured
with ``identity = "unique-id"``, by (CKA_CLASS, CKA_UNIQUE_ID) where the module reports
it -- not by a handle: each
member resolves that identity to its own handle, lazily (see Member.find_by_identity).
The pool hands the frontend an object id per identity, kept in the registry so the
same object keeps the same id across gateway restarts. A session object lives on one
member's instance only: its id maps to (member, epoch, handle) and dies with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...codec import Attribute
from ...codec import constants as ck
from ...state.base import StateStore

#: (CKA_CLASS, CKA_ID, CKA_LABEL, CKA_UNIQUE_ID); None = not part of the identity: the
#: object has no such attribute (data objects have no CKA_ID), which a find template must
#: then leave out. Either the unique id is set and CKA_ID/CKA_LABEL are None, or not.
Key = tuple[int, bytes | None, bytes | None, bytes | None]

#: session object ids live above this (token object ids come from the registry below it)
SESSION_OID_BASE = 0x40000000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pool_object (
        pool TEXT NOT NULL, oid INTEGER NOT NULL, class INTEGER NOT NULL,
        id BLOB, label BLOB, uid BLOB, PRIMARY KEY (pool, oid))""",
    # gateway replication: where an object was made, whether it could not be copied
    # (pinned to its origin) and whether it was destroyed (members that missed the
    # destruction catch up when they return)
    """CREATE TABLE IF NOT EXISTS pool_object_state (
        pool TEXT NOT NULL, oid INTEGER NOT NULL, origin TEXT, pinned TEXT,
        destroyed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (pool, oid))""",
    # gateway replication: a member that missed a creation or change of an object (it
    # was down, or the call failed there) holds no copy or an out-of-date one, and is
    # not used for that object
    """CREATE TABLE IF NOT EXISTS pool_object_stale (
        pool TEXT NOT NULL, oid INTEGER NOT NULL, member TEXT NOT NULL,
        PRIMARY KEY (pool, oid, member))""",
)


@dataclass(frozen=True)
class SessionObject:
    member: int
    epoch: int
    handle: int


class ObjectIds:
    def __init__(self, pool: str, registry: StateStore) -> None:
        self.pool = pool
        self.registry = registry
        registry.ensure(*_SCHEMA)
        columns = {row[1] for row in registry.query("PRAGMA table_info(pool_object)")}
        if "uid" not in columns:  # a registry written before CKA_UNIQUE_ID identities
            registry.ensure("ALTER TABLE pool_object ADD COLUMN uid BLOB")
        self.by_key: dict[Key, int] = {}
        self.by_oid: dict[int, Key] = {}
        for oid, cls, cid, label, uid in registry.query(
                "SELECT oid, class, id, label, uid FROM pool_object WHERE pool=?", (pool,)):
            key = (int(cls), as_bytes(cid), as_bytes(label), as_bytes(uid))
            self.by_key[key] = int(oid)
            self.by_oid[int(oid)] = key
        self._next = max(self.by_oid, default=0) + 1
        #: oid → member name it is pinned to (its key material cannot leave that member)
        self.pinned: dict[int, str] = {}
        self.origin: dict[int, str] = {}
        self.destroyed: set[int] = set()
        for oid, origin, pinned, destroyed in registry.query(
                "SELECT oid, origin, pinned, destroyed FROM pool_object_state WHERE pool=?",
                (pool,)):
            if origin:
                self.origin[int(oid)] = str(origin)
            if pinned:
                self.pinned[int(oid)] = str(pinned)
            if destroyed:
                self.destroyed.add(int(oid))
        #: oid → members whose copy is missing or out of date
        self.stale: dict[int, set[str]] = {}
        for oid, member in registry.query(
                "SELECT oid, member FROM pool_object_stale WHERE pool=?", (pool,)):
            self.stale.setdefault(int(oid), set()).add(str(member))
        self.sessions: dict[int, SessionObject] = {}
        self._next_session = SESSION_OID_BASE

    def token_oid(self, key: Key) -> int:
        oid = self.by_key.get(key)
        if oid is None:
            oid = self._claim(key)
            self._next = max(self._next, oid + 1)
            self.by_key[key] = oid
            self.by_oid[oid] = key
        return oid

    def reload(self, key: Key) -> int | None:
        """Read ``key``'s id and state from the store again (another node may have made
        or changed it since this cache was filled); its id, or None if it has none."""
        found = self.registry.query(
            "SELECT oid FROM pool_object WHERE pool=? AND class=? AND id IS ? AND "
            "label IS ? AND uid IS ?", (self.pool, *key))
        if not found:
            return None
        oid = int(found[0][0])
        self.by_key[key], self.by_oid[oid] = oid, key
        self._next = max(self._next, oid + 1)
        for origin, pinned, destroyed in self.registry.query(
                "SELECT origin, pinned, destroyed FROM pool_object_state WHERE pool=? AND "
                "oid=?", (self.pool, oid)):
            if origin:
                self.origin[oid] = str(origin)
            if pinned:
                self.pinned[oid] = str(pinned)
            if destroyed:
                self.destroyed.add(oid)
        return oid

    def _claim(self, key: Key) -> int:
        """The id of ``key`` in the store, made now if no process or node has: in one
        transaction that no other gateway on the store interleaves with, so two nodes
        that meet the same identity at once end with one id, and new ids never clash."""
        with self.registry.transaction() as tx:
            tx.lock(f"pool_object:{self.pool}")
            found = tx.query("SELECT oid FROM pool_object WHERE pool=? AND class=? AND "
                             "id IS ? AND label IS ? AND uid IS ?", (self.pool, *key))
            if found:
                return int(found[0][0])
            top = tx.query("SELECT MAX(oid) FROM pool_object WHERE pool=?", (self.pool,))
            oid = max(int(top[0][0] or 0) + 1, self._next)
            tx.execute("INSERT INTO pool_object (pool, oid, class, id, label, uid) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (self.pool, oid, *key))
        return oid

    def set_state(self, oid: int, *, origin: str | None = None, pinned: str | None = None,
                  destroyed: bool = False) -> None:
        if origin is not None:
            self.origin[oid] = origin
        if pinned is not None:
            self.pinned[oid] = pinned
        else:
            self.pinned.pop(oid, None)
        if destroyed:
            self.destroyed.add(oid)
        else:
            self.destroyed.discard(oid)
        self.registry.execute(
            "INSERT OR REPLACE INTO pool_object_state (pool, oid, origin, pinned, destroyed) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.pool, oid, self.origin.get(oid), pinned, 1 if destroyed else 0))

    def is_stale(self, oid: int, member: str) -> bool:
        return member in self.stale.get(oid, ())

    def mark_stale(self, oid: int, member: str) -> None:
        if self.is_stale(oid, member):
            return
        self.stale.setdefault(oid, set()).add(member)
        self.registry.execute("INSERT OR IGNORE INTO pool_object_stale (pool, oid, member) "
                              "VALUES (?, ?, ?)", (self.pool, oid, member))

    def clear_stale(self, oid: int, member: str) -> None:
        if not self.is_stale(oid, member):
            return
        self.stale[oid].discard(member)
        if not self.stale[oid]:
            del self.stale[oid]
        self.registry.execute("DELETE FROM pool_object_stale WHERE pool=? AND oid=? AND "
                              "member=?", (self.pool, oid, member))

    def stale_count(self, member: str) -> int:
        return sum(1 for o, ms in self.stale.items()
                   if member in ms and o not in self.destroyed)

    def rekey(self, oid: int, key: Key) -> None:
        """Object ``oid`` now has identity ``key`` (its CKA_ID or CKA_LABEL changed)."""
        old = self.by_oid.get(oid)
        if old == key:
            return
        if old is not None:
            self.by_key.pop(old, None)
        self.registry.execute("INSERT OR REPLACE INTO pool_object "
                              "(pool, oid, class, id, label, uid) VALUES (?, ?, ?, ?, ?, ?)",
                              (self.pool, oid, *key))
        self.by_key[key] = oid
        self.by_oid[oid] = key

    def session_oid(self, obj: SessionObject) -> int:
        self._next_session += 1
        self.sessions[self._next_session] = obj
        return self._next_session

    @staticmethod
    def template(key: Key) -> list[Attribute]:
        """A find template that matches this identity (token objects only)."""
        out = [Attribute(ck.CKA_TOKEN, 1, 1), Attribute(ck.CKA_CLASS, key[0], 8)]
        if key[3] is not None:
            out.append(Attribute(ck.CKA_UNIQUE_ID, key[3], len(key[3])))
        if key[1] is not None:
            out.append(Attribute(ck.CKA_ID, key[1], len(key[1])))
        if key[2] is not None:
            out.append(Attribute(ck.CKA_LABEL, key[2], len(key[2])))
        return out

    def __len__(self) -> int:
        return len(self.by_oid)


def as_bytes(v: Any) -> bytes | None:
    """A registry BLOB or attribute value as bytes (None stays None)."""
    return None if v is None else bytes(v)

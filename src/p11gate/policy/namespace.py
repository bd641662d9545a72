"""Ownership of token objects, for tenants confined to "what they created".

An object is known by its identity on the token: (CKA_CLASS, CKA_ID, CKA_LABEL). The
owner of each identity is kept in the registry, so ownership survives restarts of the
gateway and of the backend (handles do not). The gateway refuses to create an object
whose identity is already taken on the token, so an identity never names two objects
of different owners.

On a shared store (other processes or nodes write it too) the store, not this process's
copy, says who owns what: every look-up reads the row. A copy filled at start went
stale as soon as another node released or claimed an identity, and a tenant who had
owned an identity and released it elsewhere kept, on the stale node, every object later
made with it by another tenant (``tests/adversarial/test_review5_dec08_resume_node_caches.py``).
Reads that fail raise StoreError (CKR_DEVICE_ERROR): a find or creation of an ``owned``
namespace then fails closed rather than trusting the copy.
"""

from __future__ import annotations

from ..state.base import StateStore, StoreError

ObjectKey = tuple[int, bytes, bytes]  # (CKA_CLASS, CKA_ID, CKA_LABEL)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS object_owner (
        token TEXT NOT NULL, class INTEGER NOT NULL, id BLOB NOT NULL, label BLOB NOT NULL,
        owner TEXT NOT NULL, created REAL NOT NULL DEFAULT (julianday('now')),
        PRIMARY KEY (token, class, id, label))""",
)


class OwnershipStore:
    def __init__(self, registry: StateStore) -> None:
        self.registry = registry
        registry.ensure(*_SCHEMA)
        self._cache: dict[tuple[str, ObjectKey], str] = {
            (t, (c, bytes(i), bytes(lb))): o
            for t, c, i, lb, o in registry.query(
                "SELECT token, class, id, label, owner FROM object_owner")
        }

    def owner(self, token: str, key: ObjectKey) -> str | None:
        if not self.registry.shared:
            return self._cache.get((token, key))
        rows = self.registry.query(
            "SELECT owner FROM object_owner WHERE token=? AND class=? AND id=? AND label=?",
            (token, key[0], key[1], key[2]))
        owner = str(rows[0][0]) if rows else None
        if owner is None:
            self._cache.pop((token, key), None)
        else:
            self._cache[(token, key)] = owner
        return owner

    def claim(self, token: str, key: ObjectKey, owner: str) -> None:
        self.registry.execute(
            "INSERT OR REPLACE INTO object_owner (token, class, id, label, owner) "
            "VALUES (?, ?, ?, ?, ?)", (token, key[0], key[1], key[2], owner))
        self._cache[(token, key)] = owner

    def release(self, token: str, key: ObjectKey) -> None:
        self.registry.execute(
            "DELETE FROM object_owner WHERE token=? AND class=? AND id=? AND label=?",
            (token, key[0], key[1], key[2]))
        self._cache.pop((token, key), None)

    def release_token(self, token: str) -> int:
        """Forget every owner on ``token`` (C_InitToken destroyed its objects); how many."""
        self.registry.execute("DELETE FROM object_owner WHERE token=?", (token,))
        gone = [k for k in self._cache if k[0] == token]
        for k in gone:
            del self._cache[k]
        return len(gone)

    def count(self, token: str) -> int:
        """Identities owned on ``token`` (status; this process's copy when the store
        cannot be read)."""
        if self.registry.shared:
            try:
                ((n,),) = self.registry.query(
                    "SELECT COUNT(*) FROM object_owner WHERE token=?", (token,))
                return int(n)
            except StoreError:
                pass
        return sum(1 for t, _ in self._cache if t == token)

    def count_owned_by(self, owner: str) -> int:
        """Token objects ``owner`` owns, on every token (its quota counts them: on a
        shared store, those it made through every process and node)."""
        if self.registry.shared:
            ((n,),) = self.registry.query(
                "SELECT COUNT(*) FROM object_owner WHERE owner=?", (owner,))
            return int(n)
        return sum(1 for o in self._cache.values() if o == owner)

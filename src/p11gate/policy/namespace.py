"""Ownership of token objects, for tenants confined to "what they created".

An object is known by its identity on the token: (CKA_CLASS, CKA_ID, CKA_LABEL). The
owner of each identity is kept in the registry, so ownership survives restarts of the
gateway and of the backend (handles do not). The gateway refuses to create an object
whose identity is already taken on the token, so an identity never names two objects
of different owners.
"""

from __future__ import annotations

from ..state.base import StateStore

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
        return self._cache.get((token, key))

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
        return sum(1 for t, _ in self._cache if t == token)

    def count_owned_by(self, owner: str) -> int:
        """Token objects ``owner`` owns, on every token (its quota counts them)."""
        return sum(1 for o in self._cache.values() if o == owner)

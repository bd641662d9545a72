"""The persisted identity map: gateway handle ↔ KMIP unique identifier.

A KMIP server names objects by a UID it chooses; PKCS#11 clients find them by class,
CKA_ID and CKA_LABEL. The server cannot keep CKA_ID (KMIP has no such attribute), so
the gateway keeps (token, class, CKA_ID, CKA_LABEL, public attributes) ↔ UID here, in
SQLite, and writes the row in a transaction *before* the object is reported created: if
the write fails the client hears an error (fail closed) rather than getting a key that
the next restart would lose. Only public attributes are stored: never key material.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS kmip_objects (
    handle INTEGER PRIMARY KEY AUTOINCREMENT,
    token  TEXT NOT NULL,
    uid    TEXT NOT NULL,
    cls    INTEGER NOT NULL,
    attrs  TEXT NOT NULL,
    UNIQUE (token, uid)
);
"""


@dataclass
class MappedObject:
    handle: int
    uid: str
    cls: int
    attrs: dict[int, int | bytes]


def _dump(attrs: dict[int, int | bytes]) -> str:
    return json.dumps({str(k): (v if isinstance(v, int) else {"b": v.hex()})
                       for k, v in attrs.items()}, sort_keys=True)


def _load(text: str) -> dict[int, int | bytes]:
    raw: dict[str, Any] = json.loads(text)
    return {int(k): (bytes.fromhex(v["b"]) if isinstance(v, dict) else int(v))
            for k, v in raw.items()}


class IdMap:
    def __init__(self, path: str, token: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.token = token
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        os.chmod(path, 0o600)  # class, labels and ids of every key: the owner's only
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def load(self) -> list[MappedObject]:
        rows = self._db.execute("SELECT handle, uid, cls, attrs FROM kmip_objects "
                                "WHERE token = ? ORDER BY handle", (self.token,))
        return [MappedObject(h, u, c, _load(a)) for h, u, c, a in rows]

    def add(self, objs: list[tuple[str, int, dict[int, int | bytes]]]) -> list[int]:
        """Several objects (a key pair) in one transaction; their new handles."""
        handles: list[int] = []
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for uid, cls, attrs in objs:
                cur = self._db.execute(
                    "INSERT INTO kmip_objects (token, uid, cls, attrs) VALUES (?, ?, ?, ?)",
                    (self.token, uid, cls, _dump(attrs)))
                assert cur.lastrowid is not None
                handles.append(cur.lastrowid)
        return handles

    def update(self, handle: int, attrs: dict[int, int | bytes]) -> None:
        with self._db:
            self._db.execute("UPDATE kmip_objects SET attrs = ? WHERE handle = ? AND token = ?",
                             (_dump(attrs), handle, self.token))

    def remove(self, handle: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM kmip_objects WHERE handle = ? AND token = ?",
                             (handle, self.token))

    def close(self) -> None:
        self._db.close()

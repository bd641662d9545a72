"""The persisted identity map: gateway handle ↔ KMIP unique identifier.

A KMIP server names objects by a UID it chooses; PKCS#11 clients find them by class,
CKA_ID and CKA_LABEL. The server cannot keep CKA_ID (KMIP has no such attribute), so
the gateway keeps (backend, class, CKA_ID, CKA_LABEL, public attributes) ↔ UID in the
state store (table ``kmip_object``), and writes the row in a transaction *before* the
object is reported created: if the write fails the client hears CKR_DEVICE_ERROR (fail
closed) rather than getting a key that the next restart would lose. Only public
attributes are stored: never key material.

In the store, the map is one for every gateway process and node on it: a handle means
the same KMIP object everywhere, and an object one process mapped is found by the
others at their next search (the token re-reads the map then, when the store is
shared; otherwise this process wrote every row it holds). Two processes adopting
the same server object at once get the one row (``UNIQUE (token, uid)``).

Gateways before the map moved into the store kept it in its own SQLite file
(``idmap_path``, by default ``<state_dir>/kmip-<backend>.sqlite``): at start a file
found there is imported once, handles kept, and renamed ``*.imported``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

from ...state.base import StateStore

log = logging.getLogger("p11gate.kmip")

_ADD = ("INSERT INTO kmip_object (token, uid, cls, attrs) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (token, uid) DO NOTHING")
_IMPORT = ("INSERT INTO kmip_object (handle, token, uid, cls, attrs) VALUES (?, ?, ?, ?, ?) "
           "ON CONFLICT DO NOTHING")


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
    def __init__(self, store: StateStore, token: str, legacy_path: str = "") -> None:
        """The map of back end ``token`` in ``store``; a file at ``legacy_path`` (the
        map of an older gateway) is imported first. Raises StoreError, OSError,
        sqlite3.Error."""
        self.store = store
        self.token = token
        if legacy_path and os.path.exists(legacy_path):
            self._import(legacy_path)

    def load(self) -> list[MappedObject]:
        rows = self.store.query("SELECT handle, uid, cls, attrs FROM kmip_object "
                                "WHERE token = ? ORDER BY handle", (self.token,))
        return [MappedObject(int(h), str(u), int(c), _load(a)) for h, u, c, a in rows]

    def add(self, objs: list[tuple[str, int, dict[int, int | bytes]]],
            made: bool = False) -> list[int]:
        """Several objects (a key pair) in one transaction; their handles (an object
        another process mapped already keeps its handle).

        ``made``: the server has just made these objects, so a row that names one of
        their UIDs is stale (the server reissued the UID of an object that is gone: its
        database was reset or restored). It is replaced, with a new handle: kept, the
        old handle and its attributes (another tenant's label and CKA_ID, so its
        ownership) would have bound to the new object."""
        handles: list[int] = []
        with self.store.transaction() as t:
            for uid, cls, attrs in objs:
                if made:
                    t.execute("DELETE FROM kmip_object WHERE token = ? AND uid = ?",
                              (self.token, uid))
                t.execute(_ADD, (self.token, uid, cls, _dump(attrs)))
                ((handle,),) = t.query("SELECT handle FROM kmip_object WHERE token = ? "
                                       "AND uid = ?", (self.token, uid))
                handles.append(int(handle))
        return handles

    def uid_of(self, handle: int) -> str | None:
        """The UID row ``handle`` names now (None: no such row)."""
        rows = self.store.query("SELECT uid FROM kmip_object WHERE handle = ? AND token = ?",
                                (handle, self.token))
        return str(rows[0][0]) if rows else None

    def update(self, handle: int, attrs: dict[int, int | bytes]) -> None:
        self.store.execute("UPDATE kmip_object SET attrs = ? WHERE handle = ? AND token = ?",
                           (_dump(attrs), handle, self.token))

    def remove(self, handle: int) -> None:
        self.store.execute("DELETE FROM kmip_object WHERE handle = ? AND token = ?",
                           (handle, self.token))

    def _import(self, path: str) -> None:
        # [server] processes: every process starts at once and may try; the rows go in
        # once (ON CONFLICT), and the file is renamed by whichever is first
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT handle, token, uid, cls, attrs FROM kmip_objects "
                                  "WHERE token = ?", (self.token,)).fetchall()
            finally:
                db.close()
        except sqlite3.OperationalError:
            if not os.path.exists(path):
                return  # another process imported and renamed it meanwhile
            raise
        with self.store.transaction() as t:
            for row in rows:
                t.execute(_IMPORT, row)
            if self.store.engine == "postgresql":  # new handles after the imported ones
                t.query("SELECT setval(pg_get_serial_sequence('kmip_object', 'handle'), "
                        "GREATEST((SELECT MAX(handle) FROM kmip_object), 1))")
        try:
            os.replace(path, path + ".imported")
        except FileNotFoundError:
            return  # renamed by another process
        log.warning("KMIP identity map imported into the state store",
                    extra={"backend": self.token, "file": path, "objects": len(rows),
                           "renamed_to": path + ".imported"})



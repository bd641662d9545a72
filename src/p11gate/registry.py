"""The registry: the gateway's durable state, in SQLite in the state directory.

Each component that keeps state (pools: object identities and member state; policy:
object ownership) declares its own tables with :meth:`Registry.ensure`. Writes are
small and rare (object creation, member state changes), so they run synchronously on
the event loop with WAL journaling; reads are served from the components' own caches.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FILE_NAME = "registry.sqlite3"


class Registry:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / FILE_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.Lock()

    def ensure(self, *statements: str) -> None:
        """Create a component's tables and indexes (``CREATE … IF NOT EXISTS``)."""
        with self._lock:
            for sql in statements:
                self._db.execute(sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write; returns the last row id."""
        with self._lock:
            cur = self._db.execute(sql, params)
            return int(cur.lastrowid or 0)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._db.close()

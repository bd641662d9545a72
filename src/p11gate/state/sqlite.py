"""The SQLite engine of the state store (the "registry"), in the state directory: the
single-host default. Several gateway processes on one host share it (WAL; writes are
serialised by SQLite's lock, atomic conditional updates count PIN attempts).

Each component that keeps state (pools: object identities and member state; policy:
object ownership) declares its own tables with :meth:`Registry.ensure`. Writes are
small and rare (object creation, member state changes), so they run synchronously on
the event loop with WAL journaling; reads are served from the components' own caches.

Fail closed: a write that fails (full disk, read-only file, lock held too long) raises
:class:`RegistryError`, a PKCS#11 error the caller turns into undoing the action it was
recording; it is logged once, with the file and the reason. A registry that cannot be
opened at all (not an SQLite file, unreadable) raises :class:`RegistryUnusable` with a
one-line message for the operator.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..codec import ckr
from .base import StateStore, StoreError, StoreUnusable, Transaction

FILE_NAME = "registry.sqlite3"

log = logging.getLogger("p11gate.registry")

#: SQLite result codes (primary, the low byte) that mean "no space left"
_FULL = {sqlite3.SQLITE_FULL}
#: how long a locked registry is waited for (busy_timeout, and the WAL switch below)
BUSY_TIMEOUT_S = 5.0


class RegistryError(StoreError):
    """A registry write failed. CKR_DEVICE_MEMORY when the disk is full (the gateway has
    no room to record what it would make), CKR_DEVICE_ERROR otherwise."""

    def __init__(self, path: Path, error: sqlite3.Error) -> None:
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        reason = f"{error} ({getattr(error, 'sqlite_errorname', 'SQLITE_ERROR')})"
        super().__init__(str(path), reason,
                         ckr.DEVICE_MEMORY if code in _FULL else ckr.DEVICE_ERROR)
        self.args = (f"registry {path}: {reason}",)
        self.path = path


class RegistryUnusable(StoreUnusable):
    """The registry file cannot be opened or is not an SQLite database. ``str()`` is
    one line naming the file and the fix."""


def _unusable(path: Path, error: sqlite3.Error | OSError) -> RegistryUnusable:
    name = getattr(error, "sqlite_errorname", "")
    if isinstance(error, OSError):
        why = error.strerror or str(error)
        fix = "make the state directory readable and writable by the gateway's user"
    elif name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
        why = f"not a usable SQLite database ({error})"
        fix = ("restore it from a backup, or move it away to start with an empty registry "
               "(ownership, PIN changes and pool identities it held are then forgotten)")
    elif name.startswith("SQLITE_FULL"):
        why = "the disk is full"
        fix = "free space on the state directory's file system"
    elif name.startswith("SQLITE_READONLY"):
        why = f"read-only ({error})"
        fix = "make the file and the state directory writable by the gateway's user"
    elif name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        why = f"locked by another process ({error})"
        fix = "stop the other process that holds it (another gateway on this state_dir?)"
    else:
        why = f"cannot be opened ({error})"
        fix = ("check that the file and the state directory are readable and writable "
               "by the gateway's user")
    return RegistryUnusable(f"registry {path}: {why}; {fix}")


def _check(db: sqlite3.Connection) -> None:
    """Read the schema and check the pages: a file that is not SQLite, or is damaged,
    fails here instead of on the first write."""
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    rows = db.execute("PRAGMA quick_check(1)").fetchall()
    if rows and rows[0][0] != "ok":
        err = sqlite3.DatabaseError(f"integrity check: {rows[0][0]}")
        err.sqlite_errorname = "SQLITE_CORRUPT"
        raise err


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL journaling. The switch needs the file to itself, and
    SQLite answers SQLITE_BUSY at once, without its busy handler, while another process
    opens or switches the same file (several gateway processes starting on a fresh
    state_dir). So it is retried here for as long as busy_timeout would wait."""
    end = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.002
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as e:
            name = getattr(e, "sqlite_errorname", "")
            if not name.startswith("SQLITE_BUSY") or time.monotonic() + pause > end:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def check_registry(state_dir: str | os.PathLike[str]) -> str | None:
    """For `check-config`: open an existing registry read-only and check it. Returns the
    one-line problem, or None when it is usable (or does not exist yet)."""
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            _check(db)
        finally:
            db.close()
    except sqlite3.Error as e:
        return str(_unusable(path, e))
    return None


class _SqliteTransaction(Transaction):
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._db.execute(sql, params).rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._db.execute(sql, params))

    def lock(self, name: str) -> None:
        pass  # BEGIN IMMEDIATE holds the whole file until COMMIT


class Registry(StateStore):
    engine = "sqlite"

    def __init__(self, state_dir: str | os.PathLike[str], *, migrate: bool = True,
                 file_name: str = FILE_NAME) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / file_name
        self.where = str(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as e:
            raise _unusable(self.path, e) from None
        try:
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            _check(self._db)
            _use_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            self._db.close()
            raise _unusable(self.path, e) from None
        self._lock = threading.Lock()
        if migrate:
            from .migrate import apply_migrations

            apply_migrations(self)

    def _failed(self, e: sqlite3.Error, what: str = "write") -> RegistryError:
        err = RegistryError(self.path, e)
        # once per failure: the caller turns it into a PKCS#11 error without logging again
        log.error(f"registry {what} failed", extra={"path": str(self.path),
                                                    "error": err.reason})
        return err

    def ensure(self, *statements: str) -> None:
        """Create a component's tables and indexes (``CREATE … IF NOT EXISTS``)."""
        with self._lock:
            for sql in statements:
                try:
                    self._db.execute(sql)
                except sqlite3.Error as e:
                    raise _unusable(self.path, e) from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write; returns the last row id. Raises RegistryError."""
        with self._lock:
            try:
                cur = self._db.execute(sql, params)
            except sqlite3.Error as e:
                raise self._failed(e) from None
            return int(cur.lastrowid or 0)

    def update(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            try:
                return int(self._db.execute(sql, params).rowcount)
            except sqlite3.Error as e:
                raise self._failed(e) from None

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        # IMMEDIATE: the write lock is taken at BEGIN, so two processes' transactions
        # run one after the other instead of failing with SQLITE_BUSY at the first write
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._failed(e) from None
            try:
                yield _SqliteTransaction(self._db)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise self._failed(e) from None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(sql, rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._failed(e) from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, params))
            except sqlite3.Error as e:
                raise self._failed(e, "read") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

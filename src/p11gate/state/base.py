"""The state store interface: what the gateway keeps that must outlive a process and be
one across processes and nodes (pool identities, stale marks, tombstones, ownership, PIN
overrides, PIN failure counters and lock-outs).

Two engines implement it: SQLite (WAL) in the state directory, the single-host default
(:mod:`.sqlite`), and PostgreSQL for several nodes (:mod:`.postgres`). Components write
SQL once, in SQLite's dialect with ``?`` placeholders; the PostgreSQL engine translates
the few constructs that differ (see :mod:`.dialect`).

Fail closed: a statement that cannot run raises :class:`StoreError`, a PKCS#11 error
(CKR_DEVICE_ERROR; CKR_DEVICE_MEMORY when the disk is full), so a call that needs the
store fails and the caller undoes what it was recording. Calls that do not need the
store never touch it and keep working while it is down.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..codec import ckr
from ..errors import Pkcs11Error


class StoreError(Pkcs11Error):
    """A statement failed (store down, disk full, constraint broken). ``reason`` is a
    one-line description without parameters (they may hold PIN hashes)."""

    def __init__(self, where: str, reason: str, rv: int = ckr.DEVICE_ERROR) -> None:
        super().__init__(rv, f"state store {where}: {reason}")
        self.where = where
        self.reason = reason


class StoreUnusable(Exception):
    """The store cannot be opened or migrated at start (unreachable server, bad file,
    wrong credentials). ``str()`` is one line naming the store and the fix."""


class Transaction(ABC):
    """Statements that commit together or not at all."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        ...

    @abstractmethod
    def lock(self, name: str) -> None:
        """Hold ``name`` until the transaction ends: transactions that take the same
        name run one after the other on every process and node (SQLite: the whole
        store is held already)."""


class StateStore(ABC):
    #: "sqlite" or "postgresql": which migration set applies
    engine: str
    #: where the store is, for messages (a file, or the DSN without its password)
    where: str
    #: other processes or nodes use this store too: what must be one across them (PIN
    #: attempt counters) lives in it. False for the single-process SQLite default, where
    #: counting in memory keeps logins independent of the disk (a full or read-only
    #: state disk then refuses only what must be recorded)
    shared: bool = True
    #: who this gateway process is on the store, stable across its restarts (host and
    #: state directory): rows it owns (pool intents, quota counts) name it, and its
    #: lease in ``gateway_lease`` says it is alive (frontend/shared_usage.py)
    holder: str = ""

    @abstractmethod
    def ensure(self, *statements: str) -> None:
        """Create a component's tables and indexes (``CREATE … IF NOT EXISTS``)."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write in its own transaction; returns the last row id (SQLite) or
        the number of rows changed (PostgreSQL). Raises StoreError."""

    @abstractmethod
    def update(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write in its own transaction; returns the number of rows changed
        (what atomic conditional updates, e.g. taking a PIN attempt slot, rely on)."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        ...

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """Statements that must not interleave with another process's (SQLite: BEGIN
        IMMEDIATE; PostgreSQL: one connection, one transaction)."""

    @abstractmethod
    def close(self) -> None:
        ...

    def healthy(self) -> bool:
        """Whether a trivial statement runs now (for status; never raises)."""
        try:
            self.query("SELECT 1")
        except StoreError:
            return False
        return True


def rows_of(it: Iterator[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in it]

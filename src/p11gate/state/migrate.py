"""Versioned schema migrations, in the tree: ``migrations/<engine>/NNN_name.sql``, applied
in order, each in one transaction with its row in ``schema_version``. Several processes
or nodes starting at once apply each migration once: SQLite's write lock (BEGIN
IMMEDIATE) or a PostgreSQL advisory lock makes them take turns, and each one reads the
applied versions again once it holds the lock."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources

from .base import StateStore, StoreError, StoreUnusable

log = logging.getLogger("p11gate.state")

#: pg_advisory_xact_lock key: "p11gmigr" as a number, any constant would do
_PG_LOCK = 0x7031316D6967


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations(engine: str) -> list[Migration]:
    found: list[Migration] = []
    folder = resources.files(__package__).joinpath("migrations", engine)
    for entry in folder.iterdir():
        stem, _, ext = entry.name.partition(".")
        if ext != "sql" or not stem[:3].isdigit():
            continue
        text = entry.read_text(encoding="utf-8")
        # one statement per ';' at a line's end; comments are dropped
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
        stmts = tuple(s.strip() for s in "\n".join(lines).split(";\n") if s.strip())
        found.append(Migration(int(stem[:3]), stem[4:], tuple(s.rstrip(";") for s in stmts)))
    found.sort(key=lambda m: m.version)
    return found


_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                  "name TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)")


def applied_versions(store: StateStore) -> set[int]:
    store.ensure(_VERSION_TABLE)
    return {int(v) for (v,) in store.query("SELECT version FROM schema_version")}


def apply_migrations(store: StateStore) -> list[int]:
    """Bring the store's schema up to date; returns the versions applied now. Raises
    StoreUnusable with a one-line message when it cannot."""
    try:
        done = applied_versions(store)
        todo = [m for m in migrations(store.engine) if m.version not in done]
        applied: list[int] = []
        for m in todo:
            with store.transaction() as tx:
                if store.engine == "postgresql":
                    tx.query("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK,))
                if tx.query("SELECT 1 FROM schema_version WHERE version=?", (m.version,)):
                    continue  # another process applied it while this one waited
                for sql in m.statements:
                    tx.execute(sql)
                tx.execute("INSERT INTO schema_version (version, name, applied) "
                           "VALUES (?, ?, ?)", (m.version, m.name, time.time()))
            applied.append(m.version)
            log.info("state store migrated", extra={"store": store.where,
                                                    "version": m.version, "migration": m.name})
    except StoreError as e:
        raise StoreUnusable(f"state store {store.where}: cannot migrate the schema "
                            f"({e.reason}); check that the gateway's user may create "
                            "tables there") from None
    return applied


def latest_version(engine: str) -> int:
    return max((m.version for m in migrations(engine)), default=0)

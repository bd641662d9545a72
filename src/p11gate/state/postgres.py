"""The PostgreSQL engine of the state store, for several gateway nodes on one database:
psycopg 3 with a connection pool (psycopg_pool), statements in autocommit unless they
run in :meth:`PostgresStore.transaction`.

Statements run synchronously, like the SQLite engine's: they are few (object creation,
PIN attempts) and short; ``connect_timeout`` bounds how long one waits for a connection
when the server is down, and ``statement_timeout`` how long one may run. The password
comes from a file or the environment and is passed to libpq only: it is in no message,
log record or status reply (``where`` is the DSN without it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from . import dialect
from .base import StateStore, StoreError, StoreUnusable, Transaction
from .config import StateConfig

log = logging.getLogger("p11gate.state")

#: conninfo keys shown in messages (never password, nor anything else that may be secret)
_SHOWN = ("host", "hostaddr", "port", "dbname", "user")


def describe(dsn: str) -> str:
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable dsn)"
    shown = " ".join(f"{k}={parts[k]}" for k in _SHOWN if parts.get(k))
    return f"postgresql {shown}".rstrip()


def _password(cfg: StateConfig) -> str | None:
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as e:
            raise StoreUnusable(f"state store password_file {cfg.password_file}: "
                                f"cannot be read ({getattr(e, 'strerror', None) or e})"
                                ) from None
    if cfg.password_env:
        value = os.environ.get(cfg.password_env)
        if value is None:
            raise StoreUnusable(f"state store password_env {cfg.password_env}: "
                                "not set in the gateway's environment")
        return value
    return None


def _reason(e: BaseException) -> str:
    """One line: the error class and the server's primary message (its detail, which
    may quote the row's values, is left out)."""
    if isinstance(e, PoolTimeout):
        return "no connection to the server (unreachable, or all connections busy)"
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    lines = str(e).splitlines()
    text = primary or (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _PgTransaction(Transaction):
    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        self._store = store
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self._conn.execute(self._store.translate(sql), list(params))
        return max(cur.rowcount, 0)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.execute(self._store.translate(sql), list(params))
        return [tuple(r) for r in cur.fetchall()]

    def lock(self, name: str) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])


class PostgresStore(StateStore):
    engine = "postgresql"

    def __init__(self, cfg: StateConfig, *, migrate: bool = True) -> None:
        self.cfg = cfg
        self.where = describe(cfg.dsn)
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(cfg.connect_timeout)),
            "options": f"-c statement_timeout={int(cfg.statement_timeout * 1000)}",
            "application_name": "p11gate",
        }
        password = _password(cfg)
        if password is not None:
            kwargs["password"] = password
        self._keys: dict[str, list[str]] = {}
        self._keys_lock = threading.Lock()
        self.pool = ConnectionPool(cfg.dsn, min_size=1, max_size=cfg.pool_size,
                                   kwargs=kwargs, timeout=cfg.connect_timeout,
                                   check=ConnectionPool.check_connection, open=False,
                                   name="p11gate-state")
        try:
            self.pool.open(wait=True, timeout=cfg.connect_timeout)
        except PoolTimeout:
            self.pool.close()
            raise StoreUnusable(
                f"state store {self.where}: no answer within {cfg.connect_timeout:g} s; "
                "check that the server runs, the dsn, the password and pg_hba.conf") from None
        if migrate:
            from .migrate import apply_migrations

            apply_migrations(self)

    # ------------------------------------------------------------ translation

    def _primary_key(self, table: str) -> list[str]:
        with self._keys_lock:
            key = self._keys.get(table)
        if key is None:
            rows = self._run(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON "
                "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary", (table,), fetch=True)
            assert isinstance(rows, list)
            key = [str(r[0]) for r in rows]
            with self._keys_lock:
                self._keys[table] = key
        return key

    def translate(self, sql: str) -> str:
        return dialect.statement(sql, self._primary_key)

    # ------------------------------------------------------------ running

    def _failed(self, e: BaseException, what: str, sql: str = "") -> StoreError:
        err = StoreError(self.where, _reason(e))
        # the statement's first words name the table; its parameters are never logged
        log.error(f"state store {what} failed", extra={"store": self.where,
                                                       "error": err.reason,
                                                       "statement": " ".join(sql.split()[:4])})
        return err

    def _run(self, sql: str, params: Sequence[Any], *, fetch: bool,
             what: str = "write") -> list[tuple[Any, ...]] | int:
        try:
            with self.pool.connection() as conn:
                cur = conn.execute(sql, list(params))
                if fetch:
                    return [tuple(r) for r in cur.fetchall()]
                return max(cur.rowcount, 0)
        except (psycopg.Error, PoolTimeout) as e:
            raise self._failed(e, what, sql) from None

    def ensure(self, *statements: str) -> None:
        for sql in statements:
            try:
                self._run(dialect.ddl(sql), (), fetch=False)
            except StoreError as e:
                raise StoreUnusable(f"state store {self.where}: {e.reason}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._run(self.translate(sql), params, fetch=False))  # type: ignore[arg-type]

    def update(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.transaction() as tx:
            for row in rows:
                tx.execute(sql, row)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        out = self._run(self.translate(sql), params, fetch=True, what="read")
        assert isinstance(out, list)
        return out

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield _PgTransaction(self, conn)
        except (psycopg.Error, PoolTimeout) as e:
            raise self._failed(e, "transaction") from None

    def close(self) -> None:
        self.pool.close()

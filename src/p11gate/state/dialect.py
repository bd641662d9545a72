"""SQLite's SQL, as the components write it, into PostgreSQL's.

Only what the components use is translated: ``?`` placeholders (and ``IS ?``), ``INSERT OR REPLACE``
and ``INSERT OR IGNORE`` (into ``ON CONFLICT`` on the table's primary key),
``PRAGMA table_info`` and the column types of ``CREATE TABLE``. Anything else passes
unchanged, so a construct that differs shows up as a PostgreSQL syntax error in the
tests rather than as a silent difference."""

from __future__ import annotations

import re
from collections.abc import Callable

_INSERT = re.compile(
    r"^\s*INSERT\s+OR\s+(REPLACE|IGNORE)\s+INTO\s+(\w+)\s*\(([^)]*)\)(.*)$",
    re.IGNORECASE | re.DOTALL)
_PRAGMA_COLUMNS = re.compile(r"^\s*PRAGMA\s+table_info\((\w+)\)\s*$", re.IGNORECASE)
_TYPES = [
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"julianday\('now'\)", re.IGNORECASE),
     "extract(epoch FROM now()) / 86400.0 + 2440587.5"),
    (re.compile(r"\bADD\s+COLUMN\s+(?!IF\b)", re.IGNORECASE), "ADD COLUMN IF NOT EXISTS "),
]


_NULL_SAFE = re.compile(r"\bIS\s+\?", re.IGNORECASE)


def placeholders(sql: str) -> str:
    """``?`` → ``%s`` (and a literal ``%`` doubled, as psycopg wants); SQLite's
    null-safe ``IS ?`` → ``IS NOT DISTINCT FROM %s``."""
    sql = _NULL_SAFE.sub("IS NOT DISTINCT FROM ?", sql.replace("%", "%%"))
    return sql.replace("?", "%s")


def ddl(sql: str) -> str:
    for pattern, repl in _TYPES:
        sql = pattern.sub(repl, sql)
    return sql


def statement(sql: str, primary_key: Callable[[str], list[str]]) -> str:
    """One DML statement or query, translated; ``primary_key(table)`` names the table's
    key columns (for the upserts)."""
    m = _PRAGMA_COLUMNS.match(sql)
    if m:
        # the rows' second field is the column name, as in SQLite's table_info
        return ("SELECT ordinal_position - 1, column_name FROM information_schema.columns "
                f"WHERE table_schema = current_schema() AND table_name = '{m.group(1)}' "
                "ORDER BY ordinal_position")
    m = _INSERT.match(sql)
    if m:
        kind, table, cols, rest = m.groups()
        columns = [c.strip() for c in cols.split(",")]
        head = f"INSERT INTO {table} ({', '.join(columns)}){rest}"
        if kind.upper() == "IGNORE":
            sql = f"{head} ON CONFLICT DO NOTHING"
        else:
            key = primary_key(table)
            others = [c for c in columns if c not in key]
            action = (f"DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in others)}"
                      if others else "DO NOTHING")
            sql = f"{head} ON CONFLICT ({', '.join(key)}) {action}"
    return placeholders(sql)

"""Several gateway processes opening one fresh registry at the same moment (a
supervisor starting its gateway processes on an empty state_dir) all get it.

SQLite answers the switch to WAL journaling with SQLITE_BUSY at once, without waiting
in its busy handler, while another process opens or switches the same file; before the
switch was retried, about one round in four of six processes failed to start with
"locked by another process"."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from p11gate.state import sqlite
from p11gate.state.sqlite import FILE_NAME, Registry, RegistryUnusable

PROCESSES = 6
ROUNDS = 15


def _open(state_dir: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(30)
        Registry(state_dir)
        results.put("ok")
    except Exception as e:  # reported to the test, which shows it
        results.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_fresh_registry_together_all_succeed(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    failures: list[str] = []
    for n in range(ROUNDS):
        state_dir = tmp_path / f"round-{n}"
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(str(state_dir), barrier, results))
                 for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        failures += [o for o in outcomes if o != "ok"]
        db = sqlite3.connect(state_dir / FILE_NAME)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            db.close()
    assert failures == []


def test_a_lasting_lock_is_reported_not_waited_for_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry is bounded: a reader that never lets go of a fresh (not yet WAL) file
    makes the open fail after the busy timeout, with the operator's message."""
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_S", 0.5)
    holder = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()  # a shared lock, held
    try:
        began = time.monotonic()
        with pytest.raises(RegistryUnusable, match="locked by another process"):
            Registry(tmp_path)
        assert 0.4 <= time.monotonic() - began < 5
    finally:
        holder.close()
    Registry(tmp_path)  # and once it is let go, the file opens

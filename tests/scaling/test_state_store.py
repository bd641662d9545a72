"""Issue 14, point 2: one state store interface, two engines. The same components (PIN
overrides, ownership, pool identities, PIN attempts) run on SQLite and on a real
PostgreSQL server this module starts; migrations are versioned and applied once; PIN
attempts taken by several OS processes at once never exceed the limit; a store that is
down fails closed with CKR_DEVICE_ERROR and works again when it is back."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.postgres import Postgres

from p11gate.backends.pool.objects import ObjectIds
from p11gate.codec import ckr
from p11gate.frontend.pin_throttle import StoredPinThrottle
from p11gate.frontend.pins import MappedPins
from p11gate.policy.namespace import OwnershipStore
from p11gate.state import StateConfig, StateStore, StoreError, StoreUnusable, open_store
from p11gate.state.migrate import latest_version

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with Postgres() as server:
        yield server


def _config(engine: str, pg: Postgres) -> StateConfig:
    if engine == "sqlite":
        return StateConfig()
    return StateConfig(engine="postgresql", dsn=pg.dsn, password_file=str(pg.password_file),
                       connect_timeout=2.0)


@pytest.fixture(params=ENGINES)
def cfg(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[StateConfig, Path]:
    engine = request.param
    if engine == "postgresql":
        pg: Postgres = request.getfixturevalue("pg")
        store = open_store(_config(engine, pg), tmp_path)
        # every test starts from empty tables (the cluster is shared by the module)
        for (table,) in store.query(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename <> 'schema_version'"):
            store.execute(f"DELETE FROM {table}")
        store.close()
        return _config(engine, pg), tmp_path
    return StateConfig(), tmp_path


def test_migrations_are_versioned_and_applied_once(cfg: tuple[StateConfig, Path]) -> None:
    c, state_dir = cfg
    store = open_store(c, state_dir)
    rows = store.query("SELECT version, name FROM schema_version ORDER BY version")
    assert [int(v) for v, _ in rows] == list(range(1, latest_version(store.engine) + 1))
    store.close()
    again = open_store(c, state_dir)  # a second start finds nothing to do
    assert len(again.query("SELECT version FROM schema_version")) == len(rows)
    again.close()


def test_the_components_sql_runs_on_both_engines(cfg: tuple[StateConfig, Path]) -> None:
    c, state_dir = cfg
    store = open_store(c, state_dir)
    pins = MappedPins("tok", {"uid:7": "configured"}, store)
    pins.set("uid:7", "first")
    pins.set("uid:7", "second")  # INSERT OR REPLACE: an upsert on PostgreSQL
    owners = OwnershipStore(store)
    owners.claim("tok", (3, b"\x01", b"ec1"), "uid:7")
    owners.claim("tok", (3, b"\x01", b"ec1"), "uid:8")
    ids = ObjectIds("ha", store)  # reads PRAGMA table_info on both
    oid = ids.token_oid((3, b"\x01", b"ec1", None))
    ids.mark_stale(oid, "m1")
    ids.mark_stale(oid, "m1")  # INSERT OR IGNORE
    store.close()

    reopened = open_store(c, state_dir)
    assert MappedPins("tok", {"uid:7": "configured"}, reopened).get("uid:7") == "second"
    assert OwnershipStore(reopened).owner("tok", (3, b"\x01", b"ec1")) == "uid:8"
    again = ObjectIds("ha", reopened)
    assert again.by_oid[oid] == (3, b"\x01", b"ec1", None)
    assert again.is_stale(oid, "m1")
    assert reopened.query("SELECT count(*) FROM pool_object_stale")[0][0] == 1
    reopened.close()


def test_a_transaction_commits_all_or_nothing(cfg: tuple[StateConfig, Path]) -> None:
    c, state_dir = cfg
    store = open_store(c, state_dir)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.execute("INSERT INTO pin_override (token, who, hash, replaced) "
                   "VALUES (?, ?, ?, ?)", ("t", "w", "h", ""))
        raise RuntimeError("undo")
    assert store.query("SELECT count(*) FROM pin_override")[0][0] == 0
    with pytest.raises(StoreError) as e:  # a constraint broken inside: nothing kept
        with store.transaction() as tx:
            for _ in range(2):
                tx.execute("INSERT INTO pin_override (token, who, hash, replaced) "
                           "VALUES (?, ?, ?, ?)", ("t", "w", "h", ""))
    assert e.value.rv == ckr.DEVICE_ERROR
    assert store.query("SELECT count(*) FROM pin_override")[0][0] == 0
    store.close()


def _hammer(c: StateConfig, state_dir: str, rounds: int, q: Any) -> None:
    store = open_store(c, state_dir)
    t = StoredPinThrottle("tok", 3, 60.0, store)
    granted = 0
    for _ in range(rounds):
        if t.begin("uid:9") == 0:
            granted += 1
            t.failed("uid:9")
    store.close()
    q.put(granted)


def test_pin_attempts_from_many_processes_at_once_stay_within_the_limit(
    cfg: tuple[StateConfig, Path],
) -> None:
    c, state_dir = cfg
    open_store(c, state_dir).close()  # migrated before the race starts
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(c, str(state_dir), 30, q)) for _ in range(6)]
    started = time.time()
    for p in procs:
        p.start()
    granted = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    # 180 attempts from 6 processes: 3 are checked, then the identity is locked out
    assert sum(granted) == 3, granted
    store = open_store(c, state_dir)
    t = StoredPinThrottle("tok", 3, 60.0, store)
    now = time.time()
    # locked for 60 s from the third failure, which came during the race (on a loaded
    # machine the spawned processes may take many seconds to start and finish)
    locked_at = now + t.locked_for("uid:9") - 60
    assert started - 1 <= locked_at <= now, (started, locked_at, now)
    store.close()


def test_a_store_that_is_down_fails_closed_and_recovers(pg: Postgres, tmp_path: Path) -> None:
    c = _config("postgresql", pg)
    store = open_store(c, tmp_path)
    t = StoredPinThrottle("tok", 3, 60.0, store)
    assert t.begin("uid:down") == 0
    t.succeeded("uid:down")
    pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as e:
            t.begin("uid:down")  # no PIN may be checked without counting it
        assert e.value.rv == ckr.DEVICE_ERROR
        assert time.monotonic() - started < 10  # bounded by connect_timeout
        assert pg.password not in str(e.value)
        t.succeeded("uid:down")  # ending an attempt is best effort: no exception
        with pytest.raises(StoreUnusable) as unusable:
            open_store(c, tmp_path)  # a start with the store down: one clear line
        msg = str(unusable.value)
        assert "no answer within" in msg and pg.password not in msg and "\n" not in msg
    finally:
        pg.restart()
    deadline = time.monotonic() + 20
    while True:  # the pool reconnects on its own
        try:
            assert t.begin("uid:down") == 0
            break
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    t.succeeded("uid:down")
    store.close()


def test_an_older_schema_is_refused_without_migration(pg: Postgres, tmp_path: Path) -> None:
    c = StateConfig(engine="postgresql", dsn=pg.dsn, password_file=str(pg.password_file),
                    migrate_at_start=False)
    open_store(c, tmp_path, migrate=True).close()
    store: StateStore = open_store(c, tmp_path)  # up to date: accepted
    store.execute("DELETE FROM schema_version WHERE version = ?", (latest_version("postgresql"),))
    store.close()
    with pytest.raises(StoreUnusable, match="run `p11gate migrate`"):
        open_store(c, tmp_path)
    open_store(c, tmp_path, migrate=True).close()  # what `p11gate migrate` does
    open_store(c, tmp_path).close()


def _ids_of(c: StateConfig, state_dir: str, start: Any, q: Any) -> None:
    """One "node": meets identities shared with the others and its own, at once."""
    store = open_store(c, state_dir)
    ids = ObjectIds("ha", store)
    start.wait()
    me = os.getpid()
    got = {}
    for i in range(20):
        shared = (3, f"shared-{i}".encode(), b"k", None)
        own = (3, f"own-{me}-{i}".encode(), b"k", None)
        got[shared[1].decode()] = ids.token_oid(shared)
        got[own[1].decode()] = ids.token_oid(own)
    store.close()
    q.put(got)


def test_nodes_meeting_identities_at_once_agree_on_one_id_each(
    cfg: tuple[StateConfig, Path],
) -> None:
    """The race of two nodes creating objects in one replicated pool, at the store:
    the same identity gets one id on every node, different ones never share an id."""
    c, state_dir = cfg
    open_store(c, state_dir).close()
    ctx = multiprocessing.get_context("spawn")
    q, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_ids_of, args=(c, str(state_dir), start, q))
             for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    shared = {k for k in results[0] if k.startswith("shared-")}
    for k in shared:
        assert len({r[k] for r in results}) == 1, k  # one id per identity
    every = {oid for r in results for oid in r.values()}
    assert len(every) == 20 + 4 * 20  # no two identities share one
    store = open_store(c, state_dir)
    assert store.query("SELECT count(*) FROM pool_object WHERE pool='ha'")[0][0] == 100
    store.close()


def test_the_backend_counter_key_is_stored_on_both_engines(
    cfg: tuple[StateConfig, Path],
) -> None:
    """The device's own counter is keyed "\\0backend:N" (no identity can take it): a key
    PostgreSQL text would refuse as it is."""
    c, state_dir = cfg
    store = open_store(c, state_dir)
    t = StoredPinThrottle("tok", 2, 60.0, store)
    for _ in range(2):
        assert t.begin("\0backend:1") == 0
        t.failed("\0backend:1")
    assert t.locked_for("\0backend:1") > 55
    assert t.locked_for("uid:1") == 0  # another key, its own counter
    store.close()


class _EndsBetween(StoredPinThrottle):
    """A node whose refused take is followed, before it reads the row, by the end of
    every attempt in flight on another node (``other``)."""

    def __init__(self, store: StateStore, other: StoredPinThrottle, who: str) -> None:
        super().__init__("tok", 5, 30.0, store)
        self.other, self.who = other, who

    def _take_slot(self, who: str, now: float) -> bool:
        taken = super()._take_slot(who, now)
        if not taken:
            for _ in range(5):
                self.other.succeeded(self.who)
        return taken


def test_slots_freed_between_a_refused_take_and_its_read_are_no_lock_out(
    cfg: tuple[StateConfig, Path],
) -> None:
    """The node-death CI failure: eight right-PIN logins of one identity over two nodes,
    more than max_pin_failures in flight at once. One node's take was refused while the
    slots were full, the other node's logins all ended before it read the row, and the
    empty row was taken for a lock-out: CKR_PIN_LOCKED for a right PIN, the client died
    before its first call. Freed slots are taken instead."""
    c, state_dir = cfg
    store = open_store(c, state_dir)
    a = StoredPinThrottle("tok", 5, 30.0, store)
    for _ in range(5):
        assert a.begin("cert:CN=b") == 0  # five right PINs in flight on node A
    b = _EndsBetween(store, a, "cert:CN=b")
    assert asyncio.run(b.acquire("cert:CN=b")) == 0
    assert b.locked_for("cert:CN=b") == 0
    b.succeeded("cert:CN=b")
    store.close()

"""Issue 14, point 1 (quotas per identity): ``max_connections_per_identity`` and
``max_sessions_per_identity`` hold for the whole deployment, not per process. Two
gateways ("nodes") on one PostgreSQL store the test starts, and two on one SQLite file,
are driven by raw RPC clients of one uid: the connection beyond the quota is closed at
once on whichever gateway it reaches, the session beyond it gets CKR_SESSION_COUNT, and
places freed on one gateway can be taken on the other. Below that, the shared counter on
both engines: counts of a holder whose lease ran out are ignored, and takes raced from
several OS processes never exceed the limit."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import CKF_SERIAL, call, rv
from tests.gateway_proc import Gateway, RawClient
from tests.policy.tenants import raw, remove, shared_socket_dir, slot_of
from tests.postgres import Postgres
from tests.scaling.test_state_store import cfg, pg  # noqa: F401  (fixtures)
from tests.softhsm import make_token

from p11gate.codec import ckr
from p11gate.frontend import shared_usage
from p11gate.frontend.shared_usage import SharedUsage
from p11gate.state import StateConfig, StoreError, open_store

MAX_CONNS = 3
MAX_SESSIONS = 5


def _node(base: Path, sockdir: Path, name: str, hsm: dict[str, Any], state: str) -> Gateway:
    d = base / name
    d.mkdir()
    cfg_file = d / "p11gate.toml"
    cfg_file.write_text(f"""
[server]
listen = "unix:path={sockdir / (name + '.sock')}"
state_dir = "{d / 'state'}"
log_format = "json"
max_connections_per_identity = {MAX_CONNS}
max_sessions_per_identity = {MAX_SESSIONS}

{state}

[[backend]]
name = "softhsm"
module = "{hsm['module']}"
env = {{ SOFTHSM2_CONF = "{hsm['conf']}" }}

[[token]]
name = "quota"
backend = "softhsm"
select = {{ label = "quota" }}
""")
    return Gateway(cfg_file)


@contextlib.contextmanager
def _gateways(base: Path, engine: str) -> Iterator[list[Gateway]]:
    hsm = make_token(base / "softhsm", label="quota", keys=False)
    sockdir = shared_socket_dir()
    server: Postgres | None = None
    if engine == "postgresql":
        server = Postgres().start()
        state = server.state_toml()
    else:
        state = f'[state]\npath = "{base / "shared-registry.sqlite3"}"'
    gws: list[Gateway] = []
    try:
        gws = [_node(base, sockdir, n, hsm, state) for n in ("a", "b")]
        yield gws
    finally:
        for g in gws:
            g.stop()
        if server is not None:
            server.close()
        remove(sockdir)


def _refused(path: str) -> bool:
    """Whether a new connection is closed before it is served."""
    try:
        c = RawClient(path, timeout=5.0)
        c.initialize()
    except (ConnectionError, OSError):
        return True
    c.close()
    return False


def _open(c: RawClient, slot: int) -> int:
    (h,) = call(c, "C_OpenSession", slot, CKF_SERIAL)
    return int(h)


@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
def test_quotas_per_identity_hold_across_gateways(engine: str, tmp_path: Path) -> None:
    with _gateways(tmp_path, engine) as (gw_a, gw_b):
        a1, a2 = raw(gw_a.path), raw(gw_a.path)
        b1 = raw(gw_b.path)
        # three connections of one uid in all: the fourth is refused on B and on A
        assert _refused(gw_b.path)
        assert _refused(gw_a.path)
        refusals = [r for r in gw_b.records()
                    if r.get("msg") == "connection refused: limit reached"]
        assert any(r.get("limit") == "max_connections_per_identity" for r in refusals)
        # five sessions in all: three on A, two on B, then none more on either
        slot_a, slot_b = slot_of(a1, "quota"), slot_of(b1, "quota")
        a_sessions = [_open(a1, slot_a) for _ in range(3)]
        b_sessions = [_open(b1, slot_b) for _ in range(2)]
        assert rv(b1, "C_OpenSession", slot_b, CKF_SERIAL) == ckr.SESSION_COUNT
        assert rv(a2, "C_OpenSession", slot_a, CKF_SERIAL) == ckr.SESSION_COUNT
        assert len(set(a_sessions)) == 3 and len(set(b_sessions)) == 2
        # A's first connection ends: its three sessions and its place go with it
        a1.close()
        deadline = time.monotonic() + 5
        while rv(b1, "C_OpenSession", slot_b, CKF_SERIAL) != 0:
            assert time.monotonic() < deadline, "B never saw A's sessions end"
            time.sleep(0.05)
        b2 = raw(gw_b.path)  # the place on A is free for a connection to B
        assert _refused(gw_a.path)  # and taken again: three in all
        assert rv(b2, "C_OpenSession", slot_b, CKF_SERIAL) == 0
        assert rv(b2, "C_OpenSession", slot_b, CKF_SERIAL) == 0
        # 3 (b1) + 2 (b2) = 5: the quota is full again, seen from A
        assert rv(a2, "C_OpenSession", slot_a, CKF_SERIAL) == ckr.SESSION_COUNT
        for c in (a2, b1, b2):
            c.close()
        assert gw_a.alive() and gw_b.alive()


def _store(c: StateConfig, state_dir: Path) -> Any:
    store = open_store(c, state_dir)
    store.shared = True
    return store


def test_a_holder_whose_lease_ran_out_no_longer_counts(
    cfg: tuple[StateConfig, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, state_dir = cfg
    store = _store(c, state_dir)
    dead, alive = SharedUsage(store, "host:/dead"), SharedUsage(store, "host:/alive")
    assert dead.take("uid:7", "connections", (0, 0), 2)
    assert dead.take("uid:7", "connections", (1, 0), 2)
    assert not alive.take("uid:7", "connections", (0, 0), 2)  # two held by the other
    # the other holder stops renewing (it died): LEASE s later its rows do not count
    now = time.time()
    monkeypatch.setattr(shared_usage.time, "time", lambda: now + shared_usage.LEASE + 1)
    assert alive.take("uid:7", "connections", (0, 0), 2)
    assert alive.take("uid:7", "connections", (1, 0), 2)
    assert not alive.take("uid:7", "connections", (2, 0), 2)
    # a holder's heartbeat clears rows expired long before, and its own with nothing
    monkeypatch.setattr(shared_usage.time, "time",
                        lambda: now + 3 * shared_usage.LEASE)
    alive.renew({})
    assert store.query("SELECT count(*) FROM identity_usage")[0][0] == 0
    assert dead.failures == alive.failures == 0
    store.close()


def _taker(c: StateConfig, state_dir: str, rounds: int, q: Any) -> None:
    store = _store(c, Path(state_dir))
    usage = SharedUsage(store)
    mine = 0
    for _ in range(rounds):
        if usage.take("uid:8", "sessions", (1, mine), 10):
            mine += 1
    store.close()
    q.put((mine, usage.failures))


def test_takes_raced_from_many_processes_never_exceed_the_limit(
    cfg: tuple[StateConfig, Path],  # noqa: F811
) -> None:
    c, state_dir = cfg
    open_store(c, state_dir).close()  # migrated before the race starts
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(c, str(state_dir), 20, q)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    # 120 takes from 6 holders of one identity: exactly 10 places in all
    assert sum(m for m, _ in got) == 10, got
    assert all(f == 0 for _, f in got), got


class _DownStore:
    """A store that fails every statement, and counts how often it was asked."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            self.asked += 1
            raise StoreError("test store", "connection refused")
        return fail


def test_a_store_that_is_down_is_asked_once_per_retry_window(
    cfg: tuple[StateConfig, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, state_dir = cfg
    store = _store(c, state_dir)
    usage = SharedUsage(store, "host:/one")
    down = _DownStore(store)
    usage.store = down
    # down: connections are not refused for it (the per-process limit still holds)
    assert all(usage.take("uid:5", "connections", (0, 0), 1) for _ in range(50))
    usage.publish("uid:5", (1, 0))
    assert down.asked == 1 and usage.failures == 1  # one timeout, not 50
    clock = time.monotonic()
    monkeypatch.setattr(shared_usage.time, "monotonic",
                        lambda: clock + shared_usage.RETRY + 0.1)
    assert usage.take("uid:5", "connections", (0, 0), 1)
    assert down.asked == 2  # asked again once the window passed
    # back: the heartbeat finds it, and the limit counts across holders again
    usage.store = store
    usage.renew({"uid:5": (1, 0)})
    assert not SharedUsage(store, "host:/two").take("uid:5", "connections", (0, 0), 1)
    store.close()

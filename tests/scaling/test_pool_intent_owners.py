"""Pool intents on a store shared by several gateway processes or nodes (both engines):
an intent names the process that wrote it, and a process loads for reconciling only its
own (from before its restart), ownerless ones, and those of a process whose lease ran
out -- never those of a live process, which may be creating their objects right now
(reconciling them would destroy objects its client is about to be told of). Intents of
two processes never share a row."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.scaling.test_state_store import cfg, pg  # noqa: F401  (fixtures)

from p11gate.backends.pool.intents import IdentityBusy, IntentLog
from p11gate.backends.pool.objects import ObjectIds
from p11gate.codec import ckr
from p11gate.frontend.shared_usage import SharedUsage
from p11gate.state import StateConfig, StateStore, open_store

KEY = (3, b"\x01", b"being-made", None)
OTHER = (3, b"\x02", b"another", None)
STUCK = (3, b"\x03", b"left-by-a-dead-node", None)


def _process(c: StateConfig, state_dir: Path, holder: str) -> StateStore:
    store = open_store(c, state_dir)
    store.shared, store.holder = True, holder
    return store


def test_a_live_process_keeps_its_intents(cfg: tuple[StateConfig, Path]) -> None:  # noqa: F811
    c, state_dir = cfg
    a, b = _process(c, state_dir, "host:/a"), _process(c, state_dir, "host:/b")
    SharedUsage(a).renew({})  # A's heartbeat: alive
    SharedUsage(b).renew({})
    log_a = IntentLog("ha", a)
    pending = log_a.reserve([KEY], ["m1", "m2"])
    log_a.begin(pending)  # A is creating KEY now
    other = IntentLog("ha", b).reserve([OTHER], ["m1", "m2"])
    IntentLog("ha", b).begin(other)
    assert other.id != pending.id
    rows = a.query("SELECT intent, owner FROM pool_intent WHERE pool = 'ha'")
    assert sorted(rows) == sorted([(pending.id, "host:/a"), (other.id, "host:/b")])
    # B starting now does not take A's pending intent for a dead one
    assert set(IntentLog("ha", _process(c, state_dir, "host:/b")).open) == {other.id}
    # A restarted (same holder): its own intent is its to reconcile, B's is not
    assert set(IntentLog("ha", _process(c, state_dir, "host:/a")).open) == {pending.id}
    # A's lease runs out (it died and did not come back): B takes it over at its start
    a.execute("UPDATE gateway_lease SET until = 0 WHERE holder = 'host:/a'")
    assert set(IntentLog("ha", _process(c, state_dir, "host:/b")).open) == {
        pending.id, other.id}
    # a row written before intents had owners is anyone's
    a.execute("UPDATE pool_intent SET owner = NULL WHERE intent = ?", (other.id,))
    SharedUsage(a).renew({})
    assert set(IntentLog("ha", _process(c, state_dir, "host:/a")).open) == {
        pending.id, other.id}
    # a clean stop ends the lease at once
    SharedUsage(b).stop()
    assert a.query("SELECT holder FROM gateway_lease") == [("host:/a",)]
    a.close()
    b.close()


def test_one_identity_is_begun_by_one_process_at_a_time(
    cfg: tuple[StateConfig, Path],  # noqa: F811
) -> None:
    c, state_dir = cfg
    a, b = _process(c, state_dir, "host:/a"), _process(c, state_dir, "host:/b")
    SharedUsage(a).renew({})
    SharedUsage(b).renew({})
    log_a, log_b = IntentLog("ha", a), IntentLog("ha", b)
    first = log_a.reserve([KEY], ["m1"])
    log_a.begin(first)
    # B's creation of the same identity is refused while A's is pending; another is not
    with pytest.raises(IdentityBusy) as e:
        log_b.begin(log_b.reserve([KEY], ["m1"]))
    assert e.value.rv == ckr.ATTRIBUTE_VALUE_INVALID
    log_b.begin(log_b.reserve([OTHER], ["m1"]))
    # A's creation went through: its origin is recorded, its intent dropped
    objects = ObjectIds("ha", a)
    oid = objects.token_oid(KEY)
    objects.set_state(oid, origin="m1")
    log_a.done(first)
    with pytest.raises(IdentityBusy):  # made on the pool: still refused
        log_b.begin(log_b.reserve([KEY], ["m1"]))
    objects.set_state(oid, origin="m1", destroyed=True)  # destroyed through the pool
    log_b.begin(log_b.reserve([KEY], ["m1"]))
    # a dead process's pending intent does not block the identity for ever
    stuck = log_a.reserve([STUCK], ["m1"])
    log_a.begin(stuck)
    a.execute("UPDATE gateway_lease SET until = 0 WHERE holder = 'host:/a'")
    log_b.begin(log_b.reserve([STUCK], ["m1"]))
    a.close()
    b.close()


def test_a_running_process_takes_over_intents_whose_lease_runs_out(
    cfg: tuple[StateConfig, Path],  # noqa: F811
) -> None:
    """An intent of a process that dies while this one runs is taken over without a
    restart, once its lease has run out -- not while it is alive, not twice, and not a
    fragment row (those wait for a start). Alone on a store there is nothing to take."""
    c, state_dir = cfg
    a, b = _process(c, state_dir, "host:/a"), _process(c, state_dir, "host:/b")
    SharedUsage(a).renew({})
    SharedUsage(b).renew({})
    log_b = IntentLog("ha", b)  # B is running; A has not begun anything yet
    assert log_b.open == {}
    log_a = IntentLog("ha", a)
    pending = log_a.reserve([KEY], ["m1", "m2"])
    log_a.begin(pending)
    log_a.suspect_fragments("m1", {3})
    assert log_b.take_over_orphaned() == []  # A is alive: its business
    a.execute("UPDATE gateway_lease SET until = 0 WHERE holder = 'host:/a'")  # A died
    taken = log_b.take_over_orphaned()
    assert [it.id for it in taken] == [pending.id]
    assert taken[0].keys == [KEY] and taken[0].unsettled == {"m1", "m2"}
    assert not taken[0].live and taken[0].state == "pending"
    assert set(log_b.open) == {pending.id}
    assert log_b.take_over_orphaned() == []  # once
    # B's own intents are never its to take over, even with its lease gone
    mine = log_b.reserve([OTHER], ["m1"])
    log_b.begin(mine)
    b.execute("UPDATE gateway_lease SET until = 0 WHERE holder = 'host:/b'")
    log_b.open.pop(mine.id)
    assert log_b.take_over_orphaned() == []
    a.close()
    b.close()


def test_alone_on_a_store_nothing_is_taken_over(tmp_path: Path) -> None:
    store = open_store(StateConfig(), tmp_path)
    store.shared = False  # one gateway process on SQLite, as the gateway sets it
    log = IntentLog("ha", store)
    store.execute("INSERT INTO pool_intent (pool, intent, state, objects, unsettled, "
                  "created, owner) VALUES ('ha', 7, 'pending', '[]', '[]', 0, NULL)")
    assert log.take_over_orphaned() == []
    assert set(IntentLog("ha", store).open) == {7}  # a start takes it
    store.close()

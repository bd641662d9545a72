"""A gateway node killed (SIGKILL) in the middle of pool key generation, which does not
come back: another node that keeps running reconciles what it left, without a restart,
once the dead node's lease has run out.

Two gateway nodes on one host, each with its own state directory, share one SQLite
store (``[state] path``) and serve one gateway-replicated pool of three SoftHSM members.
Raw-RPC clients of node A generate key pairs until A is killed at a moment a creation is
in flight (its intent is in the store). Node B was started before, so A's intents were a
live node's business when B loaded its own. The lease of a dead node lasts 30 s after
its last heartbeat; the test ends it in the store instead of waiting. Then B, with a
client logged in, takes the intents over within a few seconds (``status``:
``intents_taken_over``) and the members, read directly, hold nothing the clients were
not told about; the labels they were not told about can be made again through B.
Before the take-over existed, the intents waited for some node's next start."""

from __future__ import annotations

import random
import socket
import sqlite3
from pathlib import Path

from tests.gateway_proc import Gateway, wait_for
from tests.pools.members import make_member, pool_config
from tests.pools.test_pool_reconcile import (
    WRAP_LABEL,
    A,
    check_members,
    creations_in_flight,
    generate,
    logged_in,
    registry_live_labels,
    run_and_kill,
)

from p11gate.admin import query
from p11gate.codec import ckr


def _node(tmp_path: Path, name: str, members: list[dict[str, str]], store_dir: Path) -> Path:
    base = tmp_path / name
    base.mkdir()
    cfg = pool_config(base, members, call_timeout=30.0, threads=1,
                      extra_pool=f'replication = "gateway"\nwrapping_key = "{WRAP_LABEL}"')
    cfg.write_text(cfg.read_text() + f'\n[state]\npath = "{store_dir / "registry.sqlite3"}"\n')
    return cfg


def test_a_dead_nodes_intents_are_reconciled_by_a_running_node(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    members = [make_member(tmp_path / "hsm", i, None) for i in range(3)]
    cfg_a = _node(tmp_path, "a", members, store_dir)
    cfg_b = _node(tmp_path, "b", members, store_dir)
    gw_a = Gateway(cfg_a)
    gw_b: Gateway | None = None
    try:
        c, sess = logged_in(gw_a)
        wrap = [A(0x0, 4), A(0x100, 0x1F), A(0x11, bytes(range(32))), A(0x1, True),
                A(0x3, WRAP_LABEL.encode()), A(0x106, True), A(0x107, True),
                A(0x103, True), A(0x162, False), A(0x2, True)]
        c.call(20, [sess, wrap])
        c.close()
        gw_b = Gateway(cfg_b)
        admin_b = str(tmp_path / "b" / "state" / "admin.sock")
        keeper, _ = logged_in(gw_b)  # B's pool is logged in: private objects in sight
        try:
            assert query(admin_b)["pools"][0]["intents_found_at_start"] == 0

            told, untold = run_and_kill(gw_a, "a", random.Random(3).uniform(1.5, 3.0),
                                        store_dir)
            assert creations_in_flight(store_dir) >= 1  # A left intents behind

            # A does not come back: its lease runs out (30 s; here at once)
            holder_a = f"{socket.gethostname()}:{(tmp_path / 'a' / 'state').resolve()}"
            db = sqlite3.connect(store_dir / "registry.sqlite3")
            try:
                assert db.execute("UPDATE gateway_lease SET until = 0 WHERE holder = ?",
                                  (holder_a,)).rowcount == 1
                db.commit()
            finally:
                db.close()

            assert wait_for(lambda: creations_in_flight(store_dir) == 0, timeout=30), \
                "B did not reconcile the dead node's intents"
            st = query(admin_b)["pools"][0]
            assert st["intents_taken_over"] >= 1 and st["intents_unsettled"] == 0, st
            check_members(members, set(told), store_dir, set(untold))

            # what the clients were not told about can be made again, through B
            live = registry_live_labels(store_dir)
            for label in untold:
                rv = generate(gw_b, label)
                assert rv == ckr.OK or (rv == ckr.ATTRIBUTE_VALUE_INVALID and label in live), \
                    (label, ckr.name(rv))
                told.append(label)
            check_members(members, set(told), store_dir, set())
            records = [r for r in gw_b.records()
                       if r.get("msg", "").startswith("pool took over the creation intents")]
            assert records and records[0]["intents"] >= 1
            print(f"\nTAKE-OVER told={len(told) - len(untold)} untold={len(untold)} "
                  f"taken_over={st['intents_taken_over']} "
                  f"destroyed={st['reconcile_destroyed']}")
        finally:
            keeper.close()
        assert gw_b.alive()
    finally:
        gw_a.stop()
        if gw_b is not None:
            gw_b.stop()

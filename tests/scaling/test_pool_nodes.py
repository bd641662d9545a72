"""Issue 14, point 2 (races between nodes): two gateway nodes on one PostgreSQL store
(the test starts it) serve one gateway-replicated pool of two SoftHSM members and
generate key pairs through it at the same time. Every member ends with exactly one copy
of each key pair, and the store holds one pool id per object, none shared. When both
nodes create the *same* identity at once, one of them gets it and the other
CKR_ATTRIBUTE_VALUE_INVALID: never two objects of one identity on a member."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.gateway_proc import Gateway
from tests.pools.members import make_member, pool_config
from tests.pools.test_replication import client, labels_on, provision_wrapping_key
from tests.postgres import Postgres

from p11gate.state import StateConfig, open_store

PER_NODE = 3


@contextlib.contextmanager
def _two_nodes(tmp_path: Path) -> Iterator[tuple[list[dict[str, Any]], list[Gateway], Postgres]]:
    """Two SoftHSM members in a gateway-replicated pool, served by two gateway nodes on
    one PostgreSQL store (the test's own server)."""
    members = [make_member(tmp_path / "hsm", i, None) for i in range(2)]
    with Postgres() as pg:
        gws: list[Gateway] = []
        try:
            for name in ("a", "b"):
                (tmp_path / name).mkdir()
                cfg = pool_config(tmp_path / name, members, extra_pool=(
                    'replication = "gateway"\nwrapping_key = "pool-wrap"'))
                cfg.write_text(cfg.read_text() + pg.state_toml(connect_timeout=None))
                gws.append(Gateway(cfg))
            provision_wrapping_key(gws[0], "pool-wrap")
            yield members, gws, pg
        finally:
            for g in gws:
                g.stop()


def test_two_nodes_generating_at_once_leave_one_copy_per_identity(tmp_path: Path) -> None:
    with _two_nodes(tmp_path) as (members, gws, pg):
        results: dict[str, Any] = {}
        lock = threading.Lock()

        def generate(gw: Gateway, label: str) -> None:
            got = client(gw, "movable", label)
            with lock:
                results[label] = got

        threads = [threading.Thread(target=generate, args=(gw, f"{n}{i}"))
                   for n, gw in zip("ab", gws, strict=True) for i in range(PER_NODE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert results == {lb: ("ok", None) for lb in results} and len(results) == 6, \
            results
        for m in members:
            listing = labels_on(m)
            for label in results:
                # one private and one public key: one copy of the pair, never two
                assert listing.count(f"label:      {label}\n") == 2, (label, listing)
        store = open_store(StateConfig(engine="postgresql", dsn=pg.dsn,
                                       password_file=str(pg.password_file)), tmp_path)
        rows = store.query("SELECT oid, label FROM pool_object WHERE pool = 'ha'")
        store.close()
        labels = [bytes(lb).decode() for _, lb in rows if lb is not None]
        assert len({oid for oid, _ in rows}) == len(rows)  # no id shared
        for label in results:
            assert labels.count(label) == 2  # the pair: one id each, from both nodes


def test_two_nodes_creating_one_identity_at_once_make_it_once(tmp_path: Path) -> None:
    with _two_nodes(tmp_path) as (members, gws, _):
        outcomes: dict[str, list[tuple[str, Any]]] = {}
        for label in ("same0", "same1", "same2"):
            got: list[tuple[str, Any]] = []
            lock = threading.Lock()

            def generate(gw: Gateway, label: str = label,
                         got: list[tuple[str, Any]] = got,
                         lock: threading.Lock = lock) -> None:
                r = client(gw, "movable", label)
                with lock:
                    got.append(r)

            threads = [threading.Thread(target=generate, args=(gw,)) for gw in gws]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            outcomes[label] = got
        print(f"\nsame identity from two nodes at once: {outcomes}")
        for label, got in outcomes.items():
            assert sorted(r[0] for r in got) == ["error", "ok"], (label, got)
            (refusal,) = [r[1] for r in got if r[0] == "error"]
            assert "AttributeValueInvalid" in refusal, refusal
            for m in members:
                listing = labels_on(m)
                # one private and one public key: one pair on each member, never two
                assert listing.count(f"label:      {label}\n") == 2, (label, listing)
        assert all(g.alive() for g in gws)

"""The KMIP identity map on both state store engines (SQLite and a real PostgreSQL
server): rows added in one transaction, a server object mapped twice (two processes
adopting it at once) keeps one row and one handle, and a map file of an older gateway
is imported with its handles, new handles coming after them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.scaling.test_state_store import cfg, pg  # noqa: F401  (fixtures)

from p11gate.backends.kmip.idmap import IdMap
from p11gate.state import StateConfig, open_store


def _legacy(path: Path, rows: list[tuple[int, str, str, int, str]]) -> None:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE kmip_objects (handle INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "token TEXT NOT NULL, uid TEXT NOT NULL, cls INTEGER NOT NULL, "
                    "attrs TEXT NOT NULL, UNIQUE (token, uid))")
        con.executemany("INSERT INTO kmip_objects VALUES (?, ?, ?, ?, ?)", rows)


def test_the_map_on_both_engines(cfg: tuple[StateConfig, Path]) -> None:  # noqa: F811
    c, state_dir = cfg
    legacy = state_dir / "kmip-k.sqlite"
    _legacy(legacy, [(500, "k", "uid-old", 3, '{"3": {"b": "6f6c64"}}'),
                     (501, "other", "uid-x", 3, "{}")])  # another back end's: not taken
    store = open_store(c, state_dir)
    m = IdMap(store, "k", str(legacy))
    assert not legacy.exists() and Path(str(legacy) + ".imported").exists()
    (old,) = m.load()
    assert (old.handle, old.uid, old.attrs) == (500, "uid-old", {3: b"old"})
    pair = m.add([("uid-pub", 2, {0x102: b"\x01"}), ("uid-priv", 3, {0x102: b"\x01"})])
    assert len(set(pair)) == 2 and min(pair) > 500  # after the imported handles
    # mapped again (another process adopted it meanwhile): the one row, the one handle
    assert IdMap(store, "k").add([("uid-pub", 2, {})]) == [pair[0]]
    m.update(pair[1], {0x3: b"renamed"})
    m.remove(old.handle)
    got = {o.uid: o for o in IdMap(store, "k").load()}
    assert sorted(got) == ["uid-priv", "uid-pub"]
    assert got["uid-priv"].attrs == {0x3: b"renamed"}
    assert IdMap(store, "other").load() == []
    store.close()

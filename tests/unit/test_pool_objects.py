"""The pool's identity map in the registry."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from p11gate.backends.pool.objects import ObjectIds
from p11gate.registry import FILE_NAME, Registry


def test_ids_persist_and_identities_by_unique_id_are_distinct(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    ids = ObjectIds("ha", reg)
    a = ids.token_oid((3, b"\x02", b"rsa1", None))
    b = ids.token_oid((3, None, None, b"u-1"))
    c = ids.token_oid((3, None, None, b"u-2"))
    assert len({a, b, c}) == 3
    assert ids.token_oid((3, None, None, b"u-1")) == b
    tmpl = {t.type: t.value for t in ObjectIds.template(ids.by_oid[b])}
    assert tmpl == {0x1: 1, 0x0: 3, 0x4: b"u-1"}  # no CKA_ID/CKA_LABEL: not the identity
    reg.close()
    again = ObjectIds("ha", Registry(tmp_path))
    assert again.by_oid == ids.by_oid
    assert again.token_oid((3, b"\x02", b"rsa1", None)) == a


def test_a_registry_from_before_unique_ids_is_upgraded(tmp_path: Path) -> None:
    # written by a release before CKA_UNIQUE_ID identities (and before migrations)
    old = sqlite3.connect(tmp_path / FILE_NAME)
    old.execute("""CREATE TABLE pool_object (pool TEXT NOT NULL, oid INTEGER NOT NULL,
                   class INTEGER NOT NULL, id BLOB, label BLOB, PRIMARY KEY (pool, oid))""")
    old.execute("INSERT INTO pool_object VALUES ('ha', 7, 3, x'01', x'656331')")
    old.commit()
    old.close()
    reg = Registry(tmp_path)
    ids = ObjectIds("ha", reg)
    assert ids.by_oid == {7: (3, b"\x01", b"ec1", None)}
    assert ids.token_oid((3, None, None, b"u")) == 8

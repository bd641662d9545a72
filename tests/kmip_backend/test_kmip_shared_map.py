"""Issue 14, point 1 (the registry's KMIP id maps): the KMIP identity map lives in the
state store, one for every gateway on it. Two gateways on one store (a real PyKMIP
server behind both, raw RPC frames in front): a key pair made through one is found
through the other by its CKA_ID (which only the map knows: KMIP has no such attribute),
signs there, and once destroyed there is gone from the first one's searches. A map file
left by an older gateway is imported at start, handles kept, and renamed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from tests.adversarial.hostile import call, s, u
from tests.gateway_proc import Gateway
from tests.kmip_backend.conftest import kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.kmip_backend.test_kmip_raw import (
    CKA_LABEL,
    CKA_MODULUS_BITS,
    CKM_RSA_KEYGEN,
    CKM_SHA256_RSA,
    MSG,
    public_key,
    session,
    sign,
)

from p11gate.codec import Mechanism

CKA_CLASS, CKA_ID, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 0x0, 0x102, 2, 3


def _gateway(base: Path, server: KmipServerProc, store: Path | None) -> Gateway:
    base.mkdir(parents=True, exist_ok=True)
    extra = f'\n[state]\npath = "{store}"\n' if store is not None else ""
    return Gateway(kmip_gateway_config(base, server, extra))


def _by_id(c: object, sess: int, cls: int, cka_id: bytes) -> list[int]:
    return c.find(sess, [u(CKA_CLASS, cls), s(CKA_ID, cka_id)])  # type: ignore[attr-defined]


def test_two_gateways_on_one_store_share_the_map(kmip_server: KmipServerProc,
                                                 tmp_path: Path) -> None:
    store = tmp_path / "shared-state.sqlite3"
    a = _gateway(tmp_path / "a", kmip_server, store)
    b = _gateway(tmp_path / "b", kmip_server, store)
    try:
        ca, sa = session(a)
        cb, sb = session(b)
        template = [s(CKA_LABEL, "shared-map"), s(CKA_ID, b"\x42\x42")]
        pub, _ = call(ca, "C_GenerateKeyPair", sa, Mechanism(CKM_RSA_KEYGEN, None),
                      [u(CKA_MODULUS_BITS, 2048), *template], template)
        key = public_key(ca, sa, pub)
        # B finds the pair by CKA_ID, which only the shared map knows, and signs with it
        (priv_b,) = _by_id(cb, sb, CKO_PRIVATE_KEY, b"\x42\x42")
        key.verify(sign(cb, sb, priv_b, Mechanism(CKM_SHA256_RSA, None)), MSG,
                   padding.PKCS1v15(), hashes.SHA256())
        assert len(_by_id(cb, sb, CKO_PUBLIC_KEY, b"\x42\x42")) == 1
        # destroyed through B: gone from A's next search too
        call(cb, "C_DestroyObject", sb, priv_b)
        assert _by_id(ca, sa, CKO_PRIVATE_KEY, b"\x42\x42") == []
        assert len(_by_id(ca, sa, CKO_PUBLIC_KEY, b"\x42\x42")) == 1
        with sqlite3.connect(store) as con:
            rows = con.execute("SELECT cls FROM kmip_object").fetchall()
        assert rows == [(CKO_PUBLIC_KEY,)]  # one row per object, not one per gateway
        ca.close()
        cb.close()
    finally:
        alive = a.alive() and b.alive()
        a.stop()
        b.stop()
        assert alive, a.log()[-2000:] + b.log()[-2000:]


def test_an_older_gateways_map_file_is_imported(kmip_server: KmipServerProc,
                                                tmp_path: Path) -> None:
    # a key pair made through a gateway; its map rows then written out the way older
    # gateways kept them (their own SQLite file), and this gateway's state removed
    first = _gateway(tmp_path / "first", kmip_server, None)
    try:
        c, sess = session(first)
        template = [s(CKA_LABEL, "legacy-map"), s(CKA_ID, b"\x07")]
        pub, _ = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                      [u(CKA_MODULUS_BITS, 2048), *template], template)
        key = public_key(c, sess, pub)
        c.close()
    finally:
        first.stop()
    with sqlite3.connect(tmp_path / "first" / "state" / "registry.sqlite3") as con:
        rows = con.execute("SELECT handle, token, uid, cls, attrs FROM kmip_object").fetchall()
    assert len(rows) == 2
    state = tmp_path / "second" / "state"
    state.mkdir(parents=True)
    legacy = state / "kmip-kmip.sqlite"
    with sqlite3.connect(legacy) as con:
        con.execute("CREATE TABLE kmip_objects (handle INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "token TEXT NOT NULL, uid TEXT NOT NULL, cls INTEGER NOT NULL, "
                    "attrs TEXT NOT NULL, UNIQUE (token, uid))")
        con.executemany("INSERT INTO kmip_objects VALUES (?, ?, ?, ?, ?)",
                        [(h + 100, *rest) for h, *rest in rows])
    second = _gateway(tmp_path / "second", kmip_server, None)
    try:
        c, sess = session(second)
        (priv,) = _by_id(c, sess, CKO_PRIVATE_KEY, b"\x07")  # CKA_ID: from the old file
        key.verify(sign(c, sess, priv, Mechanism(CKM_SHA256_RSA, None)), MSG,
                   padding.PKCS1v15(), hashes.SHA256())
        c.close()
    finally:
        second.stop()
    assert not legacy.exists() and (state / "kmip-kmip.sqlite.imported").exists()
    with sqlite3.connect(state / "registry.sqlite3") as con:
        handles = sorted(h for (h,) in con.execute("SELECT handle FROM kmip_object"))
    assert handles == sorted(h + 100 for h, *_ in rows)  # handles kept
    assert any(r.get("msg") == "KMIP identity map imported into the state store"
               and r.get("objects") == 2 for r in second.records())

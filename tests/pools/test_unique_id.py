"""Issue 3, object identity by CKA_UNIQUE_ID where the module has it.

Three members hold the same two RSA keys, which share CKA_ID and CKA_LABEL (told apart
only by their CKA_UNIQUE_ID, from tests/pools/unique_id_module.py), and an EC key for
which the module reports no CKA_UNIQUE_ID. With ``identity = "unique-id"`` the pool
lists each object once, signs with the right key, and keeps doing so when a member
dies; with the default attribute identity the two RSA keys are one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, wait_for
from tests.pools.members import PIN, import_keys, key_material, make_member, pool_config

from p11gate.admin import query
from p11gate.bench.tokens import SOFTHSM
from p11gate.codec import Attribute, AttrRequest, Mechanism

SHIM = Path(__file__).with_name("unique_id_module.py")
C_GetSlotList, C_OpenSession, C_Login, C_GetAttributeValue = 4, 10, 18, 24
C_SignInit, C_Sign = 42, 43
CKO_PRIVATE_KEY, CKA_MODULUS, CKM_SHA256_RSA_PKCS = 3, 0x120, 0x40


def _members(tmp: Path) -> tuple[list[dict[str, str]], list[rsa.RSAPublicKey]]:
    a, b = key_material(tmp / "a"), key_material(tmp / "b")
    members = [make_member(tmp, i, a) for i in range(3)]  # ec1 (id 01), rsa1 (id 02)
    for m in members:  # a second RSA key, also id 02 "rsa1"
        import_keys(m, {"rsa-priv": b["rsa-priv"], "rsa-pub": b["rsa-pub"]})
    pubs = []
    for k in (a, b):
        pub = serialization.load_der_public_key(k["rsa-pub"].read_bytes())
        assert isinstance(pub, rsa.RSAPublicKey)
        pubs.append(pub)
    return members, pubs


def _session(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 4])
    (sess,) = c.call(C_OpenSession, [slots[0], 6])
    c.call(C_Login, [sess, 1, PIN.encode()])
    return c, sess


def _sign_and_verify(c: RawClient, sess: int, handle: int, pub: rsa.RSAPublicKey) -> None:
    data = os.urandom(40)
    c.call(C_SignInit, [sess, Mechanism(CKM_SHA256_RSA_PKCS, None), handle])
    (sig,) = c.call(C_Sign, [sess, data, 512])
    pub.verify(bytes(sig), data, padding.PKCS1v15(), hashes.SHA256())  # raises if wrong


def test_unique_id_identity_keeps_keys_with_one_label_apart(tmp_path: Path) -> None:
    members, pubs = _members(tmp_path)
    cfg = pool_config(tmp_path, members, worker_command=[sys.executable, str(SHIM), SOFTHSM],
                      extra_pool='identity = "unique-id"')
    gw = Gateway(cfg)
    try:
        c, sess = _session(gw)
        rsa1 = c.find(sess, [Attribute(0, CKO_PRIVATE_KEY, 8), Attribute(3, b"rsa1", 4)])
        assert len(rsa1) == 2, rsa1  # two keys, each once (not once per member)
        privs = c.find(sess, [Attribute(0, CKO_PRIVATE_KEY, 8)])
        assert sorted(privs) == sorted({*privs}) and len(privs) == 3  # + ec1, by attributes
        by_handle = _keys_by_handle(c, sess, rsa1, pubs)
        for h, pub in by_handle.items():
            for _ in range(6):  # spread over the members
                _sign_and_verify(c, sess, h, pub)
        # a member dies: the handles keep naming the same keys on the others
        shims = [p for p in psutil.Process(gw.proc.pid).children(recursive=True)
                 if str(SHIM) in p.cmdline()]
        assert len(shims) == 3
        os.kill(shims[0].pid, signal.SIGKILL)
        for h, pub in by_handle.items():
            for _ in range(10):
                _sign_and_verify(c, sess, h, pub)
        # it comes back as a new instance; then the other two hang: the returned member
        # must find each key afresh, by its CKA_UNIQUE_ID, and serve alone
        assert wait_for(lambda: all(m["state"] == "up" for m in _status(tmp_path)), 20)
        calls_before = _status(tmp_path)[0]["calls"]
        for p in shims[1:]:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            for h, pub in by_handle.items():
                for _ in range(3):
                    _sign_and_verify(c, sess, h, pub)
            st = _status(tmp_path)
            assert st[0]["calls"] > calls_before
            assert sum(m["downs"] for m in st[1:]) >= 1, st  # the hung ones were dropped
        finally:
            for p in shims[1:]:
                with contextlib.suppress(ProcessLookupError):  # killed for the hang
                    os.kill(p.pid, signal.SIGCONT)
        # a stock client lists both keys
        r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "--login", "--pin", PIN,
                            "--list-objects", "--type", "privkey"], env=gw.client_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("label:      rsa1") == 2, r.stdout
        c.close()
    finally:
        gw.stop()
    # the identity map is in the registry: after a restart the same identities are
    # recognised (no new pool ids) and each handle still signs with its own key.
    # (Client handles belong to a connection, so they are matched to keys afresh.)
    registry = tmp_path / "state" / "registry.sqlite3"
    ids_before = _pool_ids(registry)
    assert sum(1 for _oid, cls, uid in ids_before if cls == CKO_PRIVATE_KEY and uid) == 2
    gw = Gateway(cfg)
    try:
        c, sess = _session(gw)
        rsa1 = c.find(sess, [Attribute(0, CKO_PRIVATE_KEY, 8), Attribute(3, b"rsa1", 4)])
        for h, pub in _keys_by_handle(c, sess, rsa1, pubs).items():
            _sign_and_verify(c, sess, h, pub)
        c.close()
    finally:
        gw.stop()
    assert _pool_ids(registry) == ids_before


def _keys_by_handle(c: RawClient, sess: int, handles: list[int],
                    pubs: list[rsa.RSAPublicKey]) -> dict[int, rsa.RSAPublicKey]:
    """Each handle's public key, matched by modulus; every handle a different key."""
    out = {}
    for h in handles:
        (attrs, _rv) = c.call(C_GetAttributeValue, [sess, h, [AttrRequest(CKA_MODULUS, 512)]])
        n = int.from_bytes(bytes(attrs[0].value), "big")
        (pub,) = [p for p in pubs if p.public_numbers().n == n]
        out[h] = pub
    assert len({id(p) for p in out.values()}) == len(handles) == 2
    return out


def _pool_ids(registry: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(registry)) as db:
        return list(db.execute("SELECT oid, class, uid FROM pool_object ORDER BY oid"))


def _status(base: Path) -> list[dict[str, Any]]:
    return list(query(str(base / "state" / "admin.sock"))["pools"][0]["members"])


def test_attribute_identity_cannot_tell_them_apart(tmp_path: Path) -> None:
    """Why the option exists: by CKA_CLASS + CKA_ID + CKA_LABEL the two keys are one."""
    members, _pubs = _members(tmp_path)
    gw = Gateway(pool_config(tmp_path, members,
                             worker_command=[sys.executable, str(SHIM), SOFTHSM]))
    try:
        c, sess = _session(gw)
        rsa1 = c.find(sess, [Attribute(0, CKO_PRIVATE_KEY, 8), Attribute(3, b"rsa1", 4)])
        assert len(rsa1) == 1, rsa1
        c.close()
    finally:
        gw.stop()

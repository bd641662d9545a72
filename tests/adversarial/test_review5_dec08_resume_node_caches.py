"""Fifth review (resumption and what nodes trust): two gateway nodes on one PostgreSQL
state store, as the agent spreads and resumes applications over them, and raw TLS
clients of two tenants speaking p11-kit RPC frames.

A node kept what the store says about owners of objects (``object_owner``) and about
mapped PINs changed with C_SetPIN (``pin_override``) in memory, read once at its start,
and trusted that copy over the store for the rest of its life:

* ownership: tenant B made an object, destroyed it through a node that had started
  after the creation (the store's row went; the first node still remembered B as the
  owner), and when tenant A then made an object of that identity (class, CKA_ID,
  CKA_LABEL) through any node, B found A's key through the first node and used it;
* ownership quota: each node counted an identity's owned objects from its own memory,
  so an identity got ``max_token_objects_per_identity`` once per node;
* mapped PINs: a PIN changed through one node was unknown to the others: the old PIN
  (say, the leaked one being replaced) still logged in there, and the new one was
  refused (the agent's re-login on resume failed and counted as a wrong PIN).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tests.adversarial.hostile as hs
from tests.gateway_proc import Gateway, RawClient
from tests.postgres import Postgres
from tests.remote.pki import make_pki
from tests.remote.tls_setup import TENANT_RULES, free_port, open_config, tls_socket
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr
from p11gate.frontend.pins import hash_pin

SUBJECT_A = "CN=tenant-a,O=p11gate tests"
A_PIN, A_NEW_PIN = b"a-old-pin-4711", b"a-new-pin-0815"
BACKEND_PIN = "mapped-backend-pin-31337"
MAX_OWNED = 3

MAPPED = f"""
[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
pin_mode = "mapped"
backend_pin_env = "HSM_PIN"
[token.pins]
"cert:{SUBJECT_A}" = "{hash_pin(A_PIN)}"

[[rule]]
name = "tenant-a-mapped"
subject = ["CN=tenant-a,*"]
tokens = ["mapped"]
"""


class Node:
    def __init__(self, base: Path, token: dict[str, Any], pki: dict[str, Path],
                 pg: Postgres) -> None:
        self.port = free_port()
        self.config = open_config(base, token, pki, self.port)
        text = self.config.read_text().replace(
            "[server]\n", f"[server]\nmax_token_objects_per_identity = {MAX_OWNED}\n", 1)
        self.config.write_text(text + MAPPED + TENANT_RULES + pg.state_toml())
        self.gw: Gateway | None = None

    def start(self) -> Node:
        self.gw = Gateway(self.config, env={**os.environ, "HSM_PIN": BACKEND_PIN})
        return self

    def stop(self) -> None:
        if self.gw is not None:
            self.gw.stop()
            self.gw = None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    pki = make_pki(tmp_path / "pki")
    token = make_token(tmp_path / "softhsm", keys=False)
    make_token(tmp_path / "softhsm", label="mapped", pin=BACKEND_PIN, keys=False)
    pg = Postgres().start()
    nodes = [Node(tmp_path / f"node{i}", token, pki, pg) for i in range(2)]
    try:
        yield {"pki": pki, "nodes": nodes}
    finally:
        alive = [n.gw.alive() for n in nodes if n.gw is not None]
        logs = [n.gw.log()[-2000:] for n in nodes if n.gw is not None]
        for n in nodes:
            n.stop()
        pg.close()
        assert all(alive), logs


def client(c: dict[str, Any], node: Node, who: str) -> RawClient:
    raw = RawClient(None, sock=tls_socket(c["pki"], node.port, who))
    raw.initialize()
    return raw


def session(raw: RawClient, token: str = "signing", pin: bytes | None = b"1234") -> int:
    """A read-write session on the slot of the gateway token ``token``, logged in."""
    (slots,) = hs.call(raw, "C_GetSlotList", 1, 8)
    for slot in slots:
        label = hs.call(raw, "C_GetTokenInfo", slot)[0]
        if (label.decode() if isinstance(label, bytes) else label).rstrip(" \0") == token:
            break
    else:
        raise AssertionError(f"no slot for {token}")
    (sess,) = hs.call(raw, "C_OpenSession", slot, hs.CKF_SERIAL | hs.CKF_RW)
    if pin is not None:
        assert hs.rv(raw, "C_Login", sess, hs.CKU_USER, pin) in (
            ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    return int(sess)


def find(raw: RawClient, sess: int, label: str) -> list[int]:
    hs.call(raw, "C_FindObjectsInit", sess, [hs.s(hs.CKA_LABEL, label)])
    (found,) = hs.call(raw, "C_FindObjects", sess, 16)
    hs.call(raw, "C_FindObjectsFinal", sess)
    return list(found)


def aes_key(raw: RawClient, sess: int, label: str, cka_id: bytes) -> int:
    (h,) = hs.call(raw, "C_GenerateKey", sess, Mechanism(hs.CKM_AES_KEY_GEN, None),
                   hs.aes_template(label, cka_id))
    return int(h)


def encrypt(raw: RawClient, sess: int, key: int) -> bytes:
    hs.call(raw, "C_EncryptInit", sess, Mechanism(hs.CKM_AES_ECB, None), key)
    (out,) = hs.call(raw, "C_Encrypt", sess, b"\x00" * 16, 64)
    return bytes(out)


def test_a_node_never_hands_out_an_object_by_an_owner_another_node_replaced(
        cluster: dict[str, Any]) -> None:
    n1, n2 = cluster["nodes"]
    n1.start()
    b1 = client(cluster, n1, "tenant-b")
    sb1 = session(b1)
    aes_key(b1, sb1, "payroll", b"\x42")  # B owns the identity (secret key, 42, payroll)
    n2.start()  # started after B's creation: it read B as the owner from the store
    b2 = client(cluster, n2, "tenant-b")
    sb2 = session(b2)
    (mine,) = find(b2, sb2, "payroll")
    hs.call(b2, "C_DestroyObject", sb2, mine)  # the store's row goes with it
    # tenant A makes its key of that identity through node 2 (the agent put it there)
    a2 = client(cluster, n2, "tenant-a")
    sa2 = session(a2)
    a_key = aes_key(a2, sa2, "payroll", b"\x42")
    a_ciphertext = encrypt(a2, sa2, a_key)
    # B, through node 1, which still remembered B as the identity's owner
    found = find(b1, sb1, "payroll")
    used = [encrypt(b1, sb1, h) for h in found]
    assert a_ciphertext not in used, "tenant B used tenant A's key through node 1"
    assert found == [], "tenant B found tenant A's key through node 1"
    # and A sees its key through node 1 too (it was invisible there: unknown owner)
    a1 = client(cluster, n1, "tenant-a")
    sa1 = session(a1)
    assert [encrypt(a1, sa1, h) for h in find(a1, sa1, "payroll")] == [a_ciphertext]
    # a token object B names by a guessed identity is refused (A's, through node 1)
    assert hs.rv(b1, "C_GenerateKey", sb1, Mechanism(hs.CKM_AES_KEY_GEN, None),
                 hs.aes_template("payroll", b"\x42")) == ckr.ATTRIBUTE_VALUE_INVALID


def test_the_token_object_quota_of_an_identity_is_one_across_nodes(
        cluster: dict[str, Any]) -> None:
    n1, n2 = (n.start() for n in cluster["nodes"])
    made = 0
    for i in range(2 * MAX_OWNED):
        node = (n1, n2)[i % 2]
        b = client(cluster, node, "tenant-b")
        sb = session(b)
        if hs.rv(b, "C_GenerateKey", sb, Mechanism(hs.CKM_AES_KEY_GEN, None),
                 hs.aes_template(f"q{i}", bytes([i]))) == ckr.OK:
            made += 1
        b.close()
    assert made == MAX_OWNED, f"{made} token objects made, quota {MAX_OWNED}"


def test_a_pin_changed_through_one_node_is_the_pin_on_every_node(
        cluster: dict[str, Any]) -> None:
    n1, n2 = (n.start() for n in cluster["nodes"])
    a1 = client(cluster, n1, "tenant-a")
    s1 = session(a1, "mapped", pin=None)
    assert hs.rv(a1, "C_Login", s1, hs.CKU_USER, A_PIN) == ckr.OK
    assert hs.rv(a1, "C_SetPIN", s1, A_PIN, A_NEW_PIN) == ckr.OK
    a2 = client(cluster, n2, "tenant-a")
    s2 = session(a2, "mapped", pin=None)
    old = hs.rv(a2, "C_Login", s2, hs.CKU_USER, A_PIN)
    if old == ckr.OK:
        hs.call(a2, "C_Logout", s2)
    new = hs.rv(a2, "C_Login", s2, hs.CKU_USER, A_NEW_PIN)
    assert (old, new) == (ckr.PIN_INCORRECT, ckr.OK), (ckr.name(old), ckr.name(new))

"""The agent across gateway nodes: it spreads connections over the healthy nodes, and an
application behind it rides through a node killed with -9.

Real parts: gateway nodes (`p11gate serve`, TLS listeners, certificates made by the
test) serving one SoftHSM token directory, the agent, and clients through the stock
p11-kit-client.so; raw RPC frames for the hostile cases. Each node has its own state
directory and sockets; all of them share one PostgreSQL store (a throw-away cluster the
module starts, `node_store()`), as nodes on several hosts would.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tests.adversarial.hostile as hs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, rv_of, wait_for
from tests.postgres import Postgres
from tests.remote.pki import make_pki
from tests.remote.test_clients import (
    Agent,
    free_port,
    open_config,
    rpc_over,
    start_tunnel,
    tunnel_argv,
)
from tests.softhsm import MODULE, make_token

from p11gate.codec import Attribute, AttrRequest, Mechanism, build_frame, ckr
from p11gate.state import StateConfig, open_store
from p11gate.state.base import StoreError

ROOT = Path(__file__).resolve().parents[2]
#: the token's user PIN: distinctive, so finding it in a log cannot be a coincidence
PIN = "pin-Qx7-kept-in-memory"
CKM_ECDSA, CKM_SHA256_RSA_PKCS = 0x1041, 0x40
CKO_DATA, CKO_PRIVATE_KEY = 0, 3
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_ID, CKA_VALUE = 0, 1, 3, 0x102, 0x11
CKA_SIGN, CKA_EC_PARAMS, CKM_EC_KEY_PAIR_GEN, CKM_SHA256 = 0x108, 0x180, 0x1040, 0x250
P256 = bytes.fromhex("06082a8648ce3d030107")
CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT, CKM_RSA_KEY_PAIR_GEN = 0x121, 0x122, 0x0


def node_store(pg: Postgres) -> str:
    """The nodes' one state store: the `[state]` table of every node's configuration."""
    return pg.state_toml()


class Node:
    def __init__(self, base: Path, token: dict[str, Any], pki: dict[str, Path],
                 pg: Postgres) -> None:
        self.port = free_port()
        self.config = open_config(base, token, pki, self.port)
        with self.config.open("a") as f:
            f.write(node_store(pg))
        self.address = f"tls:127.0.0.1:{self.port}"
        self.gw: Gateway | None = None
        self.start()

    def start(self) -> None:
        self.gw = Gateway(self.config)

    def kill(self) -> None:
        assert self.gw is not None
        self.gw.proc.kill()
        self.gw.proc.wait()
        self.gw.stop()

    def agent_connections(self) -> int:
        """TLS clients with the agent's certificate this node saw (its log)."""
        assert self.gw is not None
        return self.gw.log().count("cert=CN=tenant-b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("node-death")
    pki = make_pki(base / "pki")
    token = make_token(base / "softhsm", pin=PIN)
    pg = Postgres().start()  # the nodes' one state store, a throw-away cluster
    nodes = [Node(base / f"node{i}", token, pki, pg) for i in range(3)]
    pubs = {}
    for cka_id in ("01", "02"):
        out = base / f"pub{cka_id}.der"
        subprocess.run(["pkcs11-tool", "--module", MODULE, "--read-object", "--type",
                        "pubkey", "--id", cka_id, "-o", str(out)], env=token["env"],
                       check=True, capture_output=True, timeout=60)
        pubs[cka_id] = load_der_public_key(out.read_bytes())
    yield {"base": base, "pki": pki, "token": token, "nodes": nodes, "pubs": pubs, "pg": pg}
    for n in nodes:
        if n.gw is not None:
            n.gw.stop()
    pg.close()


def raw_signer(agent: Agent) -> tuple[RawClient, int, int]:
    """Through the agent: a logged-in session and the RSA key (id 02), raw frames."""
    c = RawClient(str(agent.path), timeout=60)
    c.initialize()
    (slots,) = c.call(4, [1, 8])
    (sess,) = c.call(10, [slots[0], 6])
    c.call(18, [sess, 1, PIN.encode()])
    found = c.find(sess, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8),
                          Attribute(CKA_ID, b"\x02", 1)])
    assert len(found) == 1
    return c, sess, found[0]


def verify_rsa(pub: Any, data: bytes, sig: bytes) -> None:
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())


def verify_ec(pub: Any, digest: bytes, sig: bytes) -> None:
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    n = len(sig) // 2
    pub.verify(encode_dss_signature(int.from_bytes(sig[:n], "big"),
                                    int.from_bytes(sig[n:], "big")),
               digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def node_of(agent: Agent, nodes: list[Node], before: list[int]) -> Node:
    """The node whose count of agent connections grew since ``before``."""
    assert wait_for(lambda: sum(n.agent_connections() for n in nodes) > sum(before))
    grown = [n for n, b in zip(nodes, before, strict=True) if n.agent_connections() > b]
    assert len(grown) == 1
    return grown[0]


def test_connections_spread_skip_a_dead_node_and_return_to_it(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    held = []
    try:
        before = [n.agent_connections() for n in nodes]
        for _ in range(6):
            c = RawClient(str(agent.path))
            c.initialize()
            held.append(c)
        assert wait_for(lambda: sum(n.agent_connections() for n in nodes) == sum(before) + 6)
        # least connections: 6 held connections over 3 nodes are 2 each
        assert [n.agent_connections() - b for n, b in zip(nodes, before, strict=True)] \
            == [2, 2, 2]
        nodes[1].kill()
        before = [n.agent_connections() for n in nodes]
        for _ in range(4):
            c = RawClient(str(agent.path))
            c.initialize()
            held.append(c)
        got = [n.agent_connections() - b for n, b in zip(nodes, before, strict=True)]
        assert got[1] == 0 and got[0] + got[2] == 4, got
        assert "gateway unreachable" in agent.log()
        nodes[1].start()  # the health check finds it back within its back-off
        assert wait_for(lambda: '"gateway back"' in agent.log(), timeout=20), agent.log()
        before = [n.agent_connections() for n in nodes]
        for _ in range(2):
            c = RawClient(str(agent.path))
            c.initialize()
            held.append(c)
        # node 1 has no held connection any more: it gets the new ones
        assert wait_for(lambda: nodes[1].agent_connections() - before[1] == 2)
    finally:
        for c in held:
            c.close()
        agent.stop()


def test_tunnels_spread_over_the_nodes(cluster: dict[str, Any]) -> None:
    """Each tunnel is its own process: it starts at a random node, so applications do
    not all land on the first one (16 tunnels all on one of 2 nodes: p = 2^-15)."""
    nodes: list[Node] = cluster["nodes"][:2]
    count = [lambda n=n: n.gw.log().count("cert=CN=tenant-a") for n in nodes]
    before = [c() for c in count]
    for _ in range(16):
        proc, sock = start_tunnel(tunnel_argv(cluster, *(n.address for n in nodes)))
        assert len(rpc_over(sock)) == 1
        sock.close()
        assert proc.wait(10) == 0
    assert wait_for(lambda: sum(c() for c in count) == sum(before) + 16)
    assert all(c() > b for c, b in zip(count, before, strict=True))


def test_raw_application_keeps_session_login_handles_and_multipart_operation(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        before = [n.agent_connections() for n in nodes]
        c, sess, key = raw_signer(agent)
        on = node_of(agent, nodes, before)
        (obj,) = c.call(20, [sess, [Attribute(CKA_CLASS, CKO_DATA, 8),
                                    Attribute(CKA_TOKEN, 0, 1),
                                    Attribute(CKA_VALUE, b"session only", 12)]])
        data = os.urandom(300)
        c.call(42, [sess, Mechanism(CKM_SHA256_RSA_PKCS, None), key])
        c.call(44, [sess, data[:100]])
        c.call(44, [sess, data[100:200]])
        on.kill()
        c.call(44, [sess, data[200:]])  # the node is dead: resumed on the other one
        (sig,) = c.call(45, [sess, 256])
        verify_rsa(cluster["pubs"]["02"], data, sig)
        # the session object was on the dead node: gone, with the PKCS#11 error for it
        assert rv_of(c, 24, [sess, obj, [AttrRequest(CKA_VALUE, 64)]]) \
            == ckr.OBJECT_HANDLE_INVALID
        # the login came along: the private key still signs, single-part
        c.call(42, [sess, Mechanism(CKM_SHA256_RSA_PKCS, None), key])
        (sig,) = c.call(43, [sess, data, 256])
        verify_rsa(cluster["pubs"]["02"], data, sig)
        assert "resumed on another gateway" in agent.log()
        log = agent.log()
        assert PIN not in log  # the kept PIN is not logged
        c.close()
    finally:
        agent.stop()
        for n in nodes:
            if n.gw is None or not n.gw.alive():
                n.start()


def test_search_digest_and_idle_death_resume_what_is_lost_fails_with_its_ckr(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        before = [n.agent_connections() for n in nodes]
        c, sess, key = raw_signer(agent)
        on = node_of(agent, nodes, before)
        (s2,) = c.call(10, [c.call(4, [1, 8])[0][0], 6])
        # a search half read, a digest half fed, a sign with a session key initialized
        c.call(26, [sess, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)]])
        (first,) = c.call(27, [sess, 1])
        assert len(first) == 1
        c.call(37, [s2, Mechanism(CKM_SHA256, None)])
        c.call(39, [s2, b"half "])
        pub_t = [Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_EC_PARAMS, P256, len(P256))]
        priv_t = [Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_SIGN, 1, 1)]
        _, session_key = c.call(59, [sess, Mechanism(CKM_EC_KEY_PAIR_GEN, None), pub_t,
                                     priv_t])
        s3_slot = c.call(4, [1, 8])[0][0]
        (s3,) = c.call(10, [s3_slot, 6])
        c.call(42, [s3, Mechanism(CKM_ECDSA, None), session_key])
        on.kill()
        time.sleep(0.5)  # dead while the application is idle: noticed before sending
        # a call that is not resendable still works: it had not gone out
        (obj,) = c.call(20, [sess, [Attribute(CKA_CLASS, CKO_DATA, 8),
                                    Attribute(CKA_TOKEN, 0, 1),
                                    Attribute(CKA_VALUE, b"new", 3)]])
        assert obj
        # the search goes on where it was: the rest, never the first again
        (rest,) = c.call(27, [sess, 10])
        c.call(28, [sess])
        assert len(rest) == 1 and rest[0] != first[0]
        c.call(39, [s2, b"and half"])
        (digest,) = c.call(41, [s2, 32])
        assert digest == hashlib.sha256(b"half and half").digest()
        # the session key died with its node: its operation cannot come back
        assert rv_of(c, 43, [s3, b"\x01" * 32, 64]) == ckr.OPERATION_NOT_INITIALIZED
        assert rv_of(c, 42, [s3, Mechanism(CKM_ECDSA, None), session_key]) \
            == ckr.KEY_HANDLE_INVALID
        # the token key is the same object on the new node
        c.call(42, [s3, Mechanism(CKM_SHA256_RSA_PKCS, None), key])
        (sig,) = c.call(43, [s3, b"x", 256])
        verify_rsa(cluster["pubs"]["02"], b"x", sig)
        c.close()
    finally:
        agent.stop()
        for n in nodes:
            if n.gw is None or not n.gw.alive():
                n.start()


def test_a_generate_in_flight_when_its_node_dies_fails_and_is_not_done_twice(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    """The reply of a C_GenerateKeyPair is lost with its node (killed while an RSA-4096
    key is being made): the agent cannot know whether the key exists, so the call fails
    with CKR_DEVICE_ERROR instead of making a second one; the application's session,
    login and handles go on."""
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        before = [n.agent_connections() for n in nodes]
        c, sess, key = raw_signer(agent)
        on = node_of(agent, nodes, before)
        label = hs.s(CKA_LABEL, "in-flight")
        pub = [hs.b(CKA_TOKEN, True), hs.u(CKA_MODULUS_BITS, 4096), label,
               hs.s(CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")]
        priv = [hs.b(CKA_TOKEN, True), hs.b(CKA_SIGN, True), label]
        sent = hs.send(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEY_PAIR_GEN, None),
                       pub, priv)
        time.sleep(0.1)
        on.kill()
        assert hs.answer(c, sent) == ckr.DEVICE_ERROR
        assert "may have taken effect" in agent.log()
        time.sleep(3)  # a worker of the dead node may still be finishing the key
        assert len(c.find(sess, [label])) <= 2  # one key pair at most, never two
        c.call(42, [sess, Mechanism(CKM_SHA256_RSA_PKCS, None), key])
        (sig,) = c.call(43, [sess, b"after", 256])
        verify_rsa(cluster["pubs"]["02"], b"after", sig)
        c.close()
    finally:
        agent.stop()
        for n in nodes:
            if n.gw is None or not n.gw.alive():
                n.start()


def test_after_logout_a_failover_does_not_log_in_again(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    """C_Logout forgets the kept PIN: on the new node the application is logged out, as
    it asked; logged in again, its old key handle finds its key again."""
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        before = [n.agent_connections() for n in nodes]
        c, sess, key = raw_signer(agent)
        on = node_of(agent, nodes, before)
        c.call(19, [sess])
        on.kill()
        mech = Mechanism(CKM_SHA256_RSA_PKCS, None)
        assert rv_of(c, 42, [sess, mech, key]) in (ckr.USER_NOT_LOGGED_IN,
                                                  ckr.KEY_HANDLE_INVALID)
        state = c.call(13, [sess])[1]
        assert state == 2  # CKS_RW_PUBLIC_SESSION: not logged in on the new node
        c.call(18, [sess, 1, PIN.encode()])
        c.call(42, [sess, mech, key])
        (sig,) = c.call(43, [sess, b"again", 256])
        verify_rsa(cluster["pubs"]["02"], b"again", sig)
        c.close()
    finally:
        agent.stop()
        for n in nodes:
            if n.gw is None or not n.gw.alive():
                n.start()


def test_forged_handles_through_the_agent_reach_nothing(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        a, a_sess, a_key = raw_signer(agent)
        b = RawClient(str(agent.path))
        b.initialize()
        (slots,) = b.call(4, [1, 8])
        mech = Mechanism(CKM_SHA256_RSA_PKCS, None)
        # B names A's session and A's key: neither exists in B's maps
        assert rv_of(b, 42, [a_sess, mech, a_key]) == ckr.SESSION_HANDLE_INVALID
        assert rv_of(b, 13, [a_sess]) == ckr.SESSION_HANDLE_INVALID
        (b_sess,) = b.call(10, [slots[0], 6])
        assert rv_of(b, 42, [b_sess, mech, a_key]) == ckr.KEY_HANDLE_INVALID
        assert rv_of(b, 24, [b_sess, a_key, [AttrRequest(CKA_LABEL, 64)]]) \
            == ckr.OBJECT_HANDLE_INVALID
        assert rv_of(b, 22, [b_sess, a_key]) == ckr.OBJECT_HANDLE_INVALID
        for forged in (0, 0x7FFFFFFF, 2**64 - 1):
            assert rv_of(b, 42, [b_sess, mech, forged]) == ckr.KEY_HANDLE_INVALID
            assert rv_of(b, 11, [forged]) == ckr.SESSION_HANDLE_INVALID
        # a mechanism whose parameter names an object is refused, not passed through
        b.call(18, [b_sess, 1, PIN.encode()])
        (b_key,) = b.find(b_sess, [Attribute(CKA_ID, b"\x02", 1)])[:1]
        assert rv_of(b, 62, [b_sess, Mechanism(0x360, None), b_key, []]) \
            == ckr.MECHANISM_INVALID
        # A is untouched by all this: its key still signs
        a.call(42, [a_sess, mech, a_key])
        (sig,) = a.call(43, [a_sess, b"abc", 256])
        verify_rsa(cluster["pubs"]["02"], b"abc", sig)
        a.close()
        b.close()
    finally:
        agent.stop()


def test_hostile_frames_close_only_their_own_connection_at_the_agent(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    try:
        good, sess, key = raw_signer(agent)
        hostile = [
            struct.pack(">III", 7, 0, 2**31),  # a body of 2 GiB announced
            struct.pack(">III", 7, 0, 12) + b"\x00\x00\x00\x2a" + b"\x00" * 8,  # id 42, no sig
            build_frame(7, b"\x00\x00\x00\x04\x00\x00\x00\x02uu" + b"\x00" * 3),  # short
        ]
        for junk in hostile:
            bad = RawClient(str(agent.path))
            bad.send_raw(junk)
            assert bad.closed_by_peer(10)
            bad.close()
        good.call(42, [sess, Mechanism(CKM_SHA256_RSA_PKCS, None), key])
        (sig,) = good.call(43, [sess, b"still here", 256])
        verify_rsa(cluster["pubs"]["02"], b"still here", sig)
        good.close()
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def test_without_the_agent_a_node_death_costs_only_its_connections(
        cluster: dict[str, Any]) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    assert nodes[0].gw is not None and nodes[1].gw is not None
    doomed = RawClient(nodes[0].gw.path)
    doomed.initialize()
    survivors = []
    for _ in range(3):
        c = RawClient(nodes[1].gw.path)
        c.initialize()
        survivors.append(c)
    nodes[0].kill()
    with pytest.raises((ConnectionError, OSError)):
        doomed.call(4, [1, 8])
    for c in survivors:
        (slots,) = c.call(4, [1, 8])
        assert len(slots) == 1
        c.close()
    doomed.close()
    nodes[0].start()


def percentiles(ms: list[float]) -> str:
    if len(ms) < 2:
        return f"n={len(ms)}"
    q = statistics.quantiles(ms, n=100)
    return f"n={len(ms)} p50={q[49]:.1f} ms p99={q[98]:.1f} ms"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def store_rows(pg: Postgres, tmp: Path) -> str:
    """The shared store's rows that can hold a client back: PIN attempts (in flight,
    failed, locked out) and connections counted per holder."""
    try:
        store = open_store(StateConfig(engine="postgresql", dsn=pg.dsn,
                                       password_file=str(pg.password_file)), tmp)
    except StoreError as e:
        return f"store: {e}"
    try:
        now = time.time()
        throttle = store.query("SELECT token, who, fails, inflight, inflight_until - ?, "
                               "locked_until - ? FROM pin_throttle", (now, now))
        usage = store.query("SELECT holder, who, connections, sessions, until - ? "
                            "FROM identity_usage", (now,))
    except StoreError as e:
        return f"store: {e}"
    finally:
        store.close()
    return (f"pin_throttle (token, who, fails, inflight, inflight for s, locked for s): "
            f"{throttle}\nidentity_usage (holder, who, conns, sessions, lease s): {usage}")


def clients_report(procs: list[subprocess.Popen[bytes]], outs: list[Path],
                   errs: list[Path], agent: Agent, nodes: list[Node], pg: Postgres,
                   tmp: Path) -> str:
    """What a failed step needs to be understood: each client's state, lines written
    and stderr, the store's rows and the tails of the agent's and the nodes' logs."""
    parts = [store_rows(pg, tmp)]
    for i, (p, out, err) in enumerate(zip(procs, outs, errs, strict=True)):
        lines = len(out.read_text().splitlines()) if out.exists() else "no file"
        stderr = err.read_text(errors="replace").strip() if err.exists() else ""
        parts.append(f"client {i}: exit {p.poll()}, lines {lines}, stderr: "
                     f"{tail(stderr, 10) or '(empty)'}")
    parts.append(f"agent log:\n{tail(agent.log())}")
    for i, n in enumerate(nodes):
        if n.gw is None:
            parts.append(f"node {i}: not running")
            continue
        # a node's start fills its tail with routine records: its warnings and errors
        # (a refused login, a store failure) first, then what it did last
        log = n.gw.log()
        alarms = "\n".join(line for line in log.splitlines() if '"level": "info"' not in line)
        parts.append(f"node {i} warnings and errors:\n{tail(alarms, 15)}\n"
                     f"node {i} log:\n{tail(log, 15)}")
    return "\n".join(parts)


def test_eight_clients_ride_through_a_node_killed_with_minus_9(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[Node] = cluster["nodes"][:2]
    agent = Agent(tmp_path / "agent", cluster["pki"], [n.address for n in nodes])
    stop = tmp_path / "stop"
    env = {**agent.env, "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"client{i}.jsonl" for i in range(8)]
    # stderr to files, not pipes: read while they run (the report) and never a full pipe
    # that blocks a client which has a lot to say
    errs = [out.with_suffix(".err") for out in outs]
    procs = []
    for out, err in zip(outs, errs, strict=True):
        with err.open("wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.remote.node_death_client", CLIENT_MODULE,
                 "signing", PIN, str(stop), str(out)], env=env, cwd=ROOT, stderr=f))
    try:
        assert wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for o in outs),
                        timeout=60), \
            clients_report(procs, outs, errs, agent, nodes, cluster["pg"], tmp_path)
        time.sleep(3)
        # both nodes serve from the one store: each has its rows of connections there
        store = open_store(StateConfig(engine="postgresql", dsn=cluster["pg"].dsn,
                                       password_file=str(cluster["pg"].password_file)),
                           tmp_path)
        # (a holder is "host:state directory")
        holders = {h.split(":", 1)[1]
                   for (h,) in store.query("SELECT DISTINCT holder FROM identity_usage")}
        store.close()
        assert {os.path.realpath(n.config.parent / "state") for n in nodes} <= holders, \
            holders
        killed_at = time.time()
        nodes[0].kill()
        time.sleep(3)
        nodes[0].start()
        back_at = time.time()
        time.sleep(4)
    finally:
        stop.touch()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:  # hung: the report says where it was
                p.kill()
                p.wait()
        agent_log = agent.log()
        report = clients_report(procs, outs, errs, agent, nodes, cluster["pg"], tmp_path)
        agent.stop()
    assert all(p.returncode == 0 for p in procs), report
    records = [json.loads(line) for o in outs for line in o.read_text().splitlines()]
    failed = [r for r in records if "error" in r]
    assert not failed, (failed[:5], report)
    pubs = cluster["pubs"]
    for r in records:
        data, sig = bytes.fromhex(r["data"]), bytes.fromhex(r["sig"])
        if r["kind"] == "ecdsa":
            verify_ec(pubs["01"], hashlib.sha256(data).digest(), sig)
        else:
            verify_rsa(pubs["02"], data, sig)
    phases = {
        "before": [r["ms"] for r in records if r["t"] < killed_at],
        "during": [r["ms"] for r in records if killed_at <= r["t"] < back_at],
        "after": [r["ms"] for r in records if r["t"] >= back_at],
    }
    resumed = agent_log.count("resumed on another gateway")
    for name, ms in phases.items():
        print(f"node death, 8 clients, {name}: {percentiles(ms)}, max {max(ms):.0f} ms")
    print(f"node death: {resumed} application connections resumed on the other node")
    assert all(len(ms) > 8 for ms in phases.values()), \
        ({k: len(v) for k, v in phases.items()}, report)
    assert resumed >= 1, report  # the kill was felt, and ridden out
    assert PIN not in agent_log
    assert {r["kind"] for r in records} == {"ecdsa", "rsa", "rsa-multi"}

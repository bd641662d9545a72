"""Issue 10 point 3 (and issue 15 point 4): one tenant's slow calls cost that tenant only.

A real gateway with one worker (threads = 4, call_timeout = 3 s) over SoftHSMv2. Uid A
has the `readonly` role (only `use`: session keys are all it may make) and speaks raw
frames; uid B is a bystander that signs.

* A starts six RSA key-pair generations at the largest size allowed (8192 bits, tens of
  seconds each here) from three connections at once, while B signs in a loop. Before:
  four of them held every worker thread, B's calls waited, and at the 3 s call_timeout
  the worker was killed with every session on it. Now: A holds its fair share (3 of 4
  threads), the rest of its calls queue, key generation has its own keygen_timeout, and
  B sees no error and short latencies; the worker is never restarted.
* RSA-16384 is refused with CKR_KEY_SIZE_RANGE at once, before the backend sees it (the
  worker spends no CPU on it). Before: the worker spent minutes generating it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.gateway_proc import Gateway, RawClient, worker_pids
from tests.policy.tenants import (
    CKF_SERIAL,
    CKU_USER,
    C_Login,
    C_OpenSession,
    C_SignInit,
    as_uid,
    find,
    raw,
    remove,
    shared_socket_dir,
    slot_of,
)
from tests.softhsm import make_token

from p11gate.admin import query
from p11gate.codec import (
    Attribute,
    Mechanism,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    encode_request,
)

A, B, C = 1001, 1002, 1003
PIN = "1234"
C_GenerateKeyPair, C_Sign = 59, 43
CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_ECDSA = 0x0, 0x1041
CKA_CLASS, CKA_LABEL, CKA_TOKEN, CKA_PRIVATE, CKA_SIGN = 0x0, 0x3, 0x1, 0x2, 0x108
CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT = 0x121, 0x122
CKO_PRIVATE_KEY = 3
CALL_TIMEOUT = 3.0
#: how long the bystander signs while A's generations run
WINDOW = 15.0


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("fairshare") / "softhsm", label="shared")


@pytest.fixture()
def gw(tmp_path: Path, token: dict[str, Any]) -> Iterator[dict[str, Any]]:
    sockdir = shared_socket_dir()
    cfg = tmp_path / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{tmp_path / 'state'}"
socket_mode = 0o666
log_format = "json"

[[backend]]
name = "softhsm"
module = "{token['module']}"
threads = 4
call_timeout = {CALL_TIMEOUT}
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "shared" }}

[[rule]]
name = "tenant-a"
uid = [{A}]
tokens = ["shared"]
role = "readonly"

[[rule]]
name = "tenant-c"
uid = [{C}]
tokens = ["shared"]
role = "readonly"

[[rule]]
name = "bystander"
uid = [{B}]
tokens = ["shared"]
role = "user"
""")
    g = Gateway(cfg)
    try:
        yield {"gw": g, "admin": str(tmp_path / "state" / "admin.sock")}
    finally:
        g.stop()
        remove(sockdir)


def _rsa_templates(bits: int) -> list[Any]:
    public = [Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_MODULUS_BITS, bits, 8),
              Attribute(CKA_PUBLIC_EXPONENT, b"\x01\x00\x01", 3)]
    private = [Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_PRIVATE, 1, 1),
               Attribute(CKA_SIGN, 1, 1)]
    return [Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None), public, private]


def _logged_in(path: str) -> tuple[RawClient, int]:
    c = raw(path)
    slot = slot_of(c, "shared")
    rv = 0
    try:
        c.call(C_Login, [_session(c, slot), CKU_USER, PIN.encode()])
    except ReplyError as e:
        rv = e.rv
    assert rv in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    return c, slot


def _session(c: RawClient, slot: int) -> int:
    # read-only: A's readonly role makes the token write-protected for it
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    return int(s)


def _tenant_a_generates(path: str, bits: int, connections: int, per_connection: int,
                        wait: float) -> list[tuple[int | str, float]]:
    """As A: pipeline ``per_connection`` RSA generations on sessions of each of
    ``connections`` connections; wait up to ``wait`` seconds for the replies, then hang
    up. Returns (rv or "pending", seconds) per call."""
    clients = []
    for _ in range(connections):
        c, slot = _logged_in(path)
        sessions = [_session(c, slot) for _ in range(per_connection)]
        clients.append((c, sessions))
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def reader(c: RawClient, n: int) -> None:
        for _ in range(n):
            c.sock.settimeout(max(0.1, start + wait - time.monotonic()))
            try:
                frame = c.recv_frame()
            except (TimeoutError, OSError):
                return
            if frame is None:
                return
            try:
                decode_reply(frame[1], c.dialect, C_GenerateKeyPair, [])
                rv = ckr.OK
            except ReplyError as e:
                rv = e.rv
            with lock:
                results.append((rv, time.monotonic() - start))

    threads = []
    for c, sessions in clients:
        for s in sessions:
            c.code += 1
            c.sock.sendall(build_frame(c.code, encode_request(
                C_GenerateKeyPair, [s, *_rsa_templates(bits)], c.dialect), b"client"))
        t = threading.Thread(target=reader, args=(c, len(sessions)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    for c, _ in clients:
        c.close()
    pending = connections * per_connection - len(results)
    return results + [("pending", wait)] * pending


def _bystander_signs(path: str, seconds: float) -> dict[str, Any]:
    """As B: ECDSA C_SignInit + C_Sign in a loop for ``seconds``; latencies and errors."""
    c, slot = _logged_in(path)
    c.sock.settimeout(30)
    s = _session(c, slot)
    (key,) = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8),
                         Attribute(CKA_LABEL, b"ec1", 3)])
    latencies: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            c.call(C_SignInit, [s, Mechanism(CKM_ECDSA, None), key])
            (sig,) = c.call(C_Sign, [s, b"\x5a" * 32, 128])
            assert len(sig) == 64
        except (ReplyError, OSError, ConnectionError) as e:
            errors.append(repr(e))
            if isinstance(e, OSError | ConnectionError):
                break
        latencies.append(time.monotonic() - t0)
    c.close()
    return {"latencies": latencies, "errors": errors}


def _share_of(admin: str) -> dict[str, Any]:
    shares = query(admin)["fair_share"]
    return next(s for s in shares if s["backend"] == "softhsm")


def _wait(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return bool(pred())


def test_a_bystander_keeps_signing_while_another_tenant_runs_the_slowest_calls_allowed(
    gw: dict[str, Any],
) -> None:
    g: Gateway = gw["gw"]
    (worker,) = worker_pids(g)
    out: dict[str, Any] = {}

    def bystander() -> None:
        out["bystander"] = as_uid(B, _bystander_signs, g.path, WINDOW, timeout=WINDOW + 60)

    def tenant_a() -> None:
        out["a"] = as_uid(A, _tenant_a_generates, g.path, 8192, 3, 2, WINDOW + 5,
                          timeout=WINDOW + 60)

    # B signs from before A starts until after A's generations have run for a while
    threads = [threading.Thread(target=bystander), threading.Thread(target=tenant_a)]
    threads[0].start()
    time.sleep(1.0)
    threads[1].start()
    try:
        # A's six generations are in: three hold its share, three wait in its queue
        assert _wait(lambda: _share_of(gw["admin"])["waiting"].get(f"uid:{A}", 0) >= 3, 10), \
            _share_of(gw["admin"])
        during = _share_of(gw["admin"])
        assert during["in_flight"].get(f"uid:{A}") == 3  # threads - 1
    finally:
        threads[0].join(WINDOW + 90)
        after = _share_of(gw["admin"])
        threads[1].join(WINDOW + 90)
    bystander = out["bystander"]
    lat = sorted(bystander["latencies"])
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    a_results = out["a"]
    print(f"\nbystander: {len(lat)} Init+Sign pairs in {WINDOW:.0f}s, p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms, "
          f"errors {len(bystander['errors'])}")
    print(f"tenant A: queued {after['queued_total']} of 6; in flight during the window "
          f"{during['in_flight']}, waiting {during['waiting']}; results {a_results}")
    assert bystander["errors"] == []
    assert len(lat) > 20 and lat[-1] < 10.0  # generous: before, a call waited 3 s and died
    assert after["queued_total"] >= 3 and after["refused_total"] == 0
    # A's calls ran past call_timeout under keygen_timeout: nothing was killed
    assert worker_pids(g) == [worker]
    assert not [r for r in g.records() if r.get("msg") == "backend down"]
    assert all(rv in (ckr.OK, "pending") for rv, _ in a_results), a_results
    # A hung up: the calls still queued for it are dropped, never started
    assert _wait(lambda: not _share_of(gw["admin"])["waiting"], 10)


def test_two_tenants_together_cannot_take_the_last_thread(gw: dict[str, Any]) -> None:
    """A and C each start their whole share of the slowest generations (3 + 3 on 4
    threads). Before: the six filled the worker's threads and queue, B's signatures
    waited behind them past call_timeout, and the worker was killed with every session
    on it. Now key generations never take a backend's last thread."""
    g: Gateway = gw["gw"]
    (worker,) = worker_pids(g)
    out: dict[str, Any] = {}

    def bystander() -> None:
        out["bystander"] = as_uid(B, _bystander_signs, g.path, WINDOW, timeout=WINDOW + 60)

    def tenant(uid: int) -> None:
        out[uid] = as_uid(uid, _tenant_a_generates, g.path, 8192, 3, 2, WINDOW + 5,
                          timeout=WINDOW + 60)

    threads = [threading.Thread(target=bystander), threading.Thread(target=tenant, args=(A,)),
               threading.Thread(target=tenant, args=(C,))]
    threads[0].start()
    time.sleep(1.0)
    threads[1].start()
    threads[2].start()
    try:
        assert _wait(lambda: sum(_share_of(gw["admin"])["in_flight"].values()) >= 3, 10)
        during = _share_of(gw["admin"])
    finally:
        for t in threads:
            t.join(WINDOW + 90)
    lat = sorted(out["bystander"]["latencies"])
    print(f"\nbystander: {len(lat)} Init+Sign pairs, max {lat[-1] * 1000:.1f} ms, errors "
          f"{out['bystander']['errors'][:3]}; in flight {during['in_flight']}, "
          f"waiting {during['waiting']}")
    assert out["bystander"]["errors"] == []
    assert len(lat) > 20 and lat[-1] < 10.0
    assert worker_pids(g) == [worker]
    assert not [r for r in g.records() if r.get("msg") == "backend down"]
    assert all(rv in (ckr.OK, "pending") for uid in (A, C) for rv, _ in out[uid])


def _oversized(path: str) -> tuple[int, float]:
    c, slot = _logged_in(path)
    s = _session(c, slot)
    c.sock.settimeout(30)
    t0 = time.monotonic()
    try:
        c.call(C_GenerateKeyPair, [s, *_rsa_templates(16384)])
        rv = ckr.OK
    except ReplyError as e:
        rv = e.rv
    except TimeoutError:
        rv = -1
    return rv, time.monotonic() - t0


def test_an_rsa_16384_request_is_refused_at_once_before_the_backend(gw: dict[str, Any]) -> None:
    g: Gateway = gw["gw"]
    (worker,) = worker_pids(g)
    proc = psutil.Process(worker)
    cpu_before = sum(proc.cpu_times()[:2])
    rv, seconds = as_uid(A, _oversized, g.path, timeout=90)
    time.sleep(0.5)  # a generation that had started would be burning CPU now
    cpu_spent = sum(proc.cpu_times()[:2]) - cpu_before
    print(f"\nRSA-16384: {ckr.name(rv)} in {seconds * 1000:.1f} ms; worker CPU {cpu_spent:.3f} s")
    assert rv == ckr.KEY_SIZE_RANGE
    assert seconds < 2.0
    assert cpu_spent < 0.5
    assert _share_of(gw["admin"])["in_flight"] == {}
    assert any(r.get("msg") == "key generation refused: beyond max_key_bits"
               for r in g.records())
    assert worker_pids(g) == [worker]

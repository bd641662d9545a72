"""Issue 14, point 1: ``[server] processes = 2``. The supervisor hands each connection
to the process with the fewest open ones; the lock-out holds across them; a process
killed with -9 is restarted while the other one goes on serving; the audit log stays one
well-formed stream with a record for every call; status and the metrics sum the
processes up (each one's own on request); reload reaches both."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_LABEL,
    CKF_SERIAL,
    CKM_ECDSA,
    CKO_PRIVATE_KEY,
    CKU_USER,
    call,
    pipeline,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway, wait_for
from tests.metrics_scrape import http, scrape, value
from tests.policy.tenants import raw, remove, shared_socket_dir, slot_of
from tests.softhsm import make_token

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr
from p11gate.frontend.pins import hash_pin

PIN = "proc-pin-1"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("processes")
    hsm = make_token(base / "softhsm", label="signing", pin="Backend-Secret-1")
    (base / "backend.pin").write_text("Backend-Secret-1\n")
    (base / "backend.pin").chmod(0o600)
    sockdir = shared_socket_dir()
    tokens = ""
    for name, failures in (("signing", 50), ("guarded", 3)):
        tokens += f"""
[[token]]
name = "{name}"
backend = "softhsm"
select = {{ label = "signing" }}
pin_mode = "mapped"
backend_pin_file = "{base / 'backend.pin'}"
pins = {{ "uid:0" = "{hash_pin(PIN.encode())}" }}
max_pin_failures = {failures}
pin_lockout = 60.0
"""
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"
processes = 2

[metrics]
listen = "unix:path={base / 'metrics.sock'}"

[[backend]]
name = "softhsm"
module = "{hsm['module']}"
env = {{ SOFTHSM2_CONF = "{hsm['conf']}" }}
{tokens}
""")
    g = Gateway(cfg)
    try:
        yield {"gw": g, "base": base, "admin": str(base / "state" / "admin.sock"),
               "metrics": str(base / "metrics.sock")}
    finally:
        g.stop()
        remove(sockdir)


def _per_process(env: dict[str, Any]) -> list[dict[str, Any]]:
    return list(query(env["admin"])["processes"])


def _signer(path: str) -> tuple[Any, int, int]:
    c = raw(path)
    (h,) = call(c, "C_OpenSession", slot_of(c, "signing"), CKF_SERIAL)
    assert rv(c, "C_Login", h, CKU_USER, PIN.encode()) in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    c.call(26, [h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")]])
    (found,) = c.call(27, [h, 4])
    c.call(28, [h])
    return c, h, int(found[0])


def _sign(c: Any, h: int, key: int) -> None:
    call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), key)
    (sig,) = call(c, "C_Sign", h, b"\x03" * 32, 64)
    assert len(sig) == 64


def test_both_processes_accept_and_status_sums_them(gw: dict[str, Any]) -> None:
    path = gw["gw"].path
    clients = [_signer(path) for _ in range(16)]
    procs = _per_process(gw)
    assert len(procs) == 2 and len({p["pid"] for p in procs}) == 2
    counts = [p["status"]["connections"] for p in procs]
    # the supervisor hands each to the process with fewer open: one after the other, 8/8
    assert counts == [8, 8], counts
    assert query(gw["admin"])["connections"] == 16
    # in turn: every other one went to the same process. Four of those closed, the
    # next four all go there, the one with fewer open
    for c, _, _ in clients[0:8:2]:
        c.close()
    assert wait_for(lambda: query(gw["admin"])["connections"] == 12, timeout=30)
    assert sorted(p["status"]["connections"] for p in _per_process(gw)) == [4, 8]
    more = [_signer(path) for _ in range(4)]
    assert [p["status"]["connections"] for p in _per_process(gw)] == [8, 8]
    for c, h, key in clients[1:8:2] + clients[8:] + more:
        _sign(c, h, key)
        c.close()


def test_metrics_sum_the_processes_and_show_each_on_request(gw: dict[str, Any]) -> None:
    path, address = gw["gw"].path, gw["metrics"]
    ok = {"token": "signing", "call": "C_GenerateRandom", "result": "CKR_OK"}
    before, _ = scrape(address)
    clients = []
    try:
        _metrics_of_sixteen(gw, path, address, ok, before, clients)
    finally:
        for c in clients:
            c.close()


def _metrics_of_sixteen(gw: dict[str, Any], path: str, address: str, ok: dict[str, str],
                        before: Any, clients: list[Any]) -> None:
    for _ in range(16):
        c = raw(path)
        clients.append(c)
        (h,) = call(c, "C_OpenSession", slot_of(c, "signing"), CKF_SERIAL)
        for _ in range(5):
            call(c, "C_GenerateRandom", h, 32)
    served = [p["status"]["connections"] for p in _per_process(gw)]
    assert served == [8, 8], served  # each process answered 40 of the 80 calls
    after, _ = scrape(address)
    assert value(after, "p11gate_calls_total", **ok) - value(
        before, "p11gate_calls_total", **ok) == 80
    assert value(after, "p11gate_connections", listener=gw["gw"].address) == 16
    assert value(after, "p11gate_backend_up", backend="softhsm") == 1  # up in both
    assert value(after, "p11gate_metrics_processes_missing") == 0
    # per process: two sets of samples, labelled, that add up to the sum
    status, body = http(address, b"GET /metrics?per_process=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    each: dict[str, float] = {}
    conns: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for smp in fam.samples:
            labels = dict(smp.labels)
            proc = labels.pop("process", None)
            if smp.name == "p11gate_calls_total" and labels == ok:
                assert proc is not None
                each[proc] = smp.value
            if smp.name == "p11gate_connections" and labels == {"listener": gw["gw"].address}:
                assert proc is not None
                conns[proc] = smp.value
    assert sorted(each) == ["0", "1"], each
    assert sum(each.values()) == value(after, "p11gate_calls_total", **ok)
    assert sorted(conns.values()) == sorted(float(n) for n in served), (conns, served)


def test_the_lockout_holds_across_the_processes(gw: dict[str, Any]) -> None:
    path = gw["gw"].path
    codes: list[int] = []
    lock = threading.Lock()

    def flood() -> None:
        c = raw(path)
        slot = slot_of(c, "guarded")
        sessions = [call(c, "C_OpenSession", slot, CKF_SERIAL)[0] for _ in range(10)]
        got = pipeline(c, [("C_Login", [h, CKU_USER, b"wrong-pin"]) for h in sessions])
        c.close()
        with lock:
            codes.extend(got)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 80
    assert 1 <= codes.count(ckr.PIN_INCORRECT) <= 3, codes
    assert codes.count(ckr.PIN_LOCKED) == 80 - codes.count(ckr.PIN_INCORRECT)


def test_a_killed_process_is_restarted_and_the_other_serves_meanwhile(
    gw: dict[str, Any],
) -> None:
    path = gw["gw"].path
    before = _per_process(gw)
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # while it is down (and being restarted) every new connection is served
    for _ in range(10):
        c, h, key = _signer(path)
        _sign(c, h, key)
        c.close()
    assert wait_for(lambda: all("status" in p for p in _per_process(gw))
                    and _per_process(gw)[0]["pid"] != victim, timeout=30), gw["gw"].log()[-3000:]
    after = _per_process(gw)
    assert after[0]["restarts"] == 1 and after[1]["pid"] == before[1]["pid"]
    c, h, key = _signer(path)
    _sign(c, h, key)
    c.close()


def test_one_audit_stream_with_every_call(gw: dict[str, Any]) -> None:
    path = gw["gw"].path
    audit = Path(gw["base"]) / "state" / "audit.jsonl"
    start = len(audit.read_bytes().splitlines())
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                c, h, key = _signer(path)
                _sign(c, h, key)
                c.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    time.sleep(0.5)
    lines = audit.read_bytes().splitlines()[start:]
    records = [json.loads(line) for line in lines]  # every line whole: none cut or mixed
    logins = [r for r in records if r.get("op") == "C_Login"]
    assert len(logins) == 80, len(logins)
    # written by both processes
    assert all(p["status"]["audit_records"] > 0 for p in _per_process(gw))


def test_reload_reaches_every_process(gw: dict[str, Any]) -> None:
    reply = query(gw["admin"], "reload", timeout=60)
    assert reply["ok"] is True and len(reply["processes"]) == 2, reply
    assert [p["status"]["reloads"] for p in _per_process(gw)] == [1, 1]


def test_p11gate_status_shows_the_sum_and_each_process(gw: dict[str, Any]) -> None:
    import subprocess
    import sys

    c, _, _ = _signer(gw["gw"].path)  # one connection open while asked
    try:
        text = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--socket",
                               gw["admin"]], capture_output=True, text=True, timeout=60)
        assert text.returncode == 0, text.stderr
        as_json = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--socket",
                                  gw["admin"], "--json"], capture_output=True, text=True,
                                 timeout=60)
        reply = json.loads(as_json.stdout)
        assert reply["connections"] == 1
        assert sum(p["status"]["connections"] for p in reply["processes"]) == 1
    finally:
        c.close()

"""The Prometheus endpoint of a real gateway: counters equal the calls made, by raw RPC
and through the stock p11-kit-client.so (python-pkcs11); failures, lock-outs and
denials counted; restarts seen; no PIN in a scrape; off by default; abuse of the metrics
port costs the clients nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests import gateway_proc
from tests.adversarial.fail_closed_env import fill, tmpfs
from tests.gateway_proc import (
    CLIENT_MODULE,
    Gateway,
    RawClient,
    rv_of,
    sign,
    wait_for,
    worker_pids,
    write_config,
)
from tests.metrics_scrape import http, scrape, serves, value
from tests.softhsm import make_token

from p11gate.codec import CALLS_BY_NAME, Mechanism, ReplyError, ckr

ID = {n: c.id for n, c in CALLS_BY_NAME.items()}
#: distinctive PINs: a scrape must contain neither (a plain "1234" could be a number)
PIN = "Qz7-right-PIN-x91"
WRONG = "Wv3-wrong-PIN-k42"
N_RAW = 40
N_PY = 15
CKM_ECDSA = 0x1041

RULES = """
[[rule]]
name = "users"
everyone = true
tokens = ["*"]
role = "user"
"""


def metrics_gateway(base: Path, token: dict[str, Any], listen: str,
                    isolation: str = "process", extra: str = "") -> tuple[Gateway, str]:
    cfg = write_config(base, token, isolation=isolation)
    text = cfg.read_text().replace(
        'select = {', 'max_pin_failures = 3\npin_lockout = 600.0\nselect = {')
    cfg.write_text(text + RULES + f'\n[metrics]\nlisten = "{listen}"\n' + extra)
    gw = Gateway(cfg)
    assert gw.proc.stdout is not None
    line = gw.proc.stdout.readline().decode()
    assert line.startswith("# metrics on "), line
    return gw, line.removeprefix("# metrics on ").split(" ", 1)[0]


def signer(path: str) -> tuple[RawClient, int, int]:
    return gateway_proc.signer(path, PIN)


PY_SIGNER = f"""
import sys, pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label="signing")
with tok.open(user_pin={PIN!r}) as s:
    key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label="ec1")
    for _ in range(int(sys.argv[2])):
        assert len(key.sign(b"\\x07" * 32, mechanism=Mechanism.ECDSA)) == 64
print("ok")
"""


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm"), label="anchor", pin=PIN)


@pytest.fixture(scope="module")
def tcp(token: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    gw, address = metrics_gateway(tmp_path_factory.mktemp("gw-tcp"), token, "127.0.0.1:0")
    yield gw, address
    alive = gw.alive()
    gw.stop()
    assert alive, gw.log()[-3000:]


def test_counters_equal_the_calls_made(tcp: tuple[Gateway, str]) -> None:
    gw, address = tcp
    before, _ = scrape(address)
    assert value(before, "p11gate_backend_up", backend="softhsm") == 1
    c, sess, key = signer(gw.path)
    for _ in range(N_RAW):
        sign(c, sess, key)
    after, _ = scrape(address)
    ok = {"token": "signing", "result": "CKR_OK"}

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("p11gate_calls_total", call="C_Sign", **ok) == N_RAW
    assert delta("p11gate_calls_total", call="C_SignInit", **ok) == N_RAW
    assert delta("p11gate_calls_total", call="C_Login", **ok) == 1
    assert delta("p11gate_calls_total", call="C_OpenSession", **ok) == 1
    # calls that name no token: under token ""
    assert delta("p11gate_calls_total", token="", call="C_GetSlotList", result="CKR_OK") == 1
    assert delta("p11gate_calls_total", token="", call="C_Initialize", result="CKR_OK") == 1
    hist = {"token": "signing", "call": "C_Sign"}
    assert delta("p11gate_call_duration_seconds_count", **hist) == N_RAW
    assert delta("p11gate_call_duration_seconds_bucket", le="+Inf", **hist) == N_RAW
    assert 0 < delta("p11gate_call_duration_seconds_sum", **hist) < N_RAW * 1.0
    assert value(after, "p11gate_client_sessions", token="signing") == 1
    listener = f"unix:path={gw.path}"
    assert value(after, "p11gate_connections", listener=listener) == 1
    assert delta("p11gate_connections_accepted_total", listener=listener) == 1

    # through the stock p11-kit-client.so: python-pkcs11 signs N_PY times
    mid = after
    r = subprocess.run([sys.executable, "-c", PY_SIGNER, CLIENT_MODULE, str(N_PY)],
                       env=gw.client_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr
    c.close()
    after, _ = scrape(address)
    sign_ok = value(after, "p11gate_calls_total", call="C_Sign", **ok) - value(
        mid, "p11gate_calls_total", call="C_Sign", **ok)
    init_ok = value(after, "p11gate_calls_total", call="C_SignInit", **ok) - value(
        mid, "p11gate_calls_total", call="C_SignInit", **ok)
    assert init_ok == N_PY
    # python-pkcs11 asks for the length first (NULL buffer), then signs: two C_Sign
    # frames per signature, the second answered from the first (design: size queries)
    assert sign_ok == 2 * N_PY
    count = value(after, "p11gate_call_duration_seconds_count", **hist) - value(
        mid, "p11gate_call_duration_seconds_count", **hist)
    assert count == sign_ok


def test_failures_lockouts_denials_and_no_pin(tcp: tuple[Gateway, str]) -> None:
    gw, address = tcp
    holder, _, _ = signer(gw.path)  # logged in: later PINs are checked by the gateway
    before, _ = scrape(address)
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
    (sess,) = c.call(ID["C_OpenSession"], [slots[0], 6])
    # role "user": an SO login is a policy denial
    assert rv_of(c, ID["C_Login"], [sess, 0, PIN.encode()]) == ckr.USER_TYPE_INVALID
    rvs = [rv_of(c, ID["C_Login"], [sess, 1, WRONG.encode()]) for _ in range(4)]
    # max_pin_failures = 3: three wrong PINs, then the identity is locked out
    assert rvs == [ckr.PIN_INCORRECT] * 3 + [ckr.PIN_LOCKED]
    after, text = scrape(address)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    login = {"token": "signing", "call": "C_Login"}
    assert delta("p11gate_calls_total", result="CKR_PIN_INCORRECT", **login) == 3
    assert delta("p11gate_calls_total", result="CKR_PIN_LOCKED", **login) == 1
    assert delta("p11gate_calls_total", result="CKR_USER_TYPE_INVALID", **login) == 1
    assert delta("p11gate_pin_lockouts_total", token="signing") == 1
    assert delta("p11gate_policy_denials_total", token="signing") == 1
    assert value(after, "p11gate_audit_write_failures_total") == 0
    for secret in (PIN, WRONG):
        assert secret not in text
        assert secret not in gw.log()
    c.close()
    holder.close()


def test_worker_restart_counted(tcp: tuple[Gateway, str]) -> None:
    gw, address = tcp
    before, _ = scrape(address)
    assert value(before, "p11gate_backend_up", backend="softhsm") == 1
    restarts = value(before, "p11gate_backend_restarts_total", backend="softhsm")
    (pid,) = worker_pids(gw)
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        s, _ = scrape(address)
        return (value(s, "p11gate_backend_restarts_total", backend="softhsm") == restarts + 1
                and value(s, "p11gate_backend_up", backend="softhsm") == 1)

    assert wait_for(restarted, timeout=20), gw.log()[-2000:]


def test_abuse_of_the_metrics_port_costs_clients_nothing(tcp: tuple[Gateway, str]) -> None:
    gw, address = tcp
    host, port = address.rsplit(":", 1)
    assert http(address, b"GARBAGE\r\n\r\n")[0] == 400
    assert http(address, b"POST /metrics HTTP/1.1\r\n\r\n")[0] == 405
    assert http(address, b"GET /../etc/passwd HTTP/1.1\r\n\r\n")[0] == 404
    assert http(address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")[0] == 431
    stop = threading.Event()
    held: list[socket.socket] = []
    made = [0]

    def hostile() -> None:
        # idle connections beyond MAX_CLIENTS, half-sent heads, binary junk, repeated
        while not stop.is_set():
            s = socket.socket()
            try:
                s.settimeout(2)
                s.connect((host, int(port)))
                s.sendall(os.urandom(512) if len(held) % 2 else b"GET /metr")
                held.append(s)
                made[0] += 1
            except OSError:
                s.close()
            if len(held) > 300:
                for old in held[:200]:
                    old.close()
                del held[:200]

    t = threading.Thread(target=hostile, daemon=True)
    t.start()
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
        (sess,) = c.call(ID["C_OpenSession"], [slots[0], 6])
        worst = 0.0
        for _ in range(300):
            t0 = time.perf_counter()
            (rnd,) = c.call(ID["C_GenerateRandom"], [sess, 32])
            worst = max(worst, time.perf_counter() - t0)
            assert len(rnd) == 32
        c.close()
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
    assert made[0] > 2 * 32  # well beyond MAX_CLIENTS
    assert worst < 1.0, worst
    assert gw.alive()
    # once the abuse stops the endpoint serves again
    assert wait_for(lambda: serves(address), timeout=10)
    print(json.dumps({"hostile_connections": made[0], "worst_random_s": round(worst, 4)}))


def test_unix_socket_endpoint(tmp_path: Path) -> None:
    tok = make_token(tmp_path / "hsm", label="anchor", pin=PIN, keys=False)
    path = str(tmp_path / "m" / "metrics.sock")
    (tmp_path / "gw").mkdir()
    gw, shown = metrics_gateway(tmp_path / "gw", tok, f"unix:path={path}",
                                isolation="none")
    try:
        assert shown == f"unix:path={path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        before, _ = scrape(path)
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
        (sess,) = c.call(ID["C_OpenSession"], [slots[0], 6])
        for _ in range(7):
            c.call(ID["C_GenerateRandom"], [sess, 16])
        with pytest.raises(ReplyError):
            c.call(ID["C_SignInit"], [sess, Mechanism(CKM_ECDSA, None), 12345])
        after, _ = scrape(path)
        rnd = {"token": "signing", "call": "C_GenerateRandom", "result": "CKR_OK"}
        assert value(after, "p11gate_calls_total", **rnd) - value(
            before, "p11gate_calls_total", **rnd) == 7
        bad = {"token": "signing", "call": "C_SignInit", "result": "CKR_KEY_HANDLE_INVALID"}
        assert value(after, "p11gate_calls_total", **bad) == 1
        assert value(after, "p11gate_backend_restarts_total", backend="softhsm") == 0
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
    assert alive, gw.log()[-3000:]
    assert not os.path.exists(path)  # removed at stop


def test_metrics_off_by_default(token: dict[str, Any], tmp_path: Path) -> None:
    gw = Gateway(write_config(tmp_path, token))
    try:
        c = RawClient(gw.path)
        c.initialize()
        c.close()
        procs = [psutil.Process(gw.proc.pid)]
        procs += procs[0].children(recursive=True)
        listening = [conn for p in procs for conn in p.net_connections(kind="inet")
                     if conn.status == psutil.CONN_LISTEN]
        assert listening == []
        assert not any(r.get("msg") == "metrics listening" for r in gw.records())
    finally:
        gw.stop()


def test_metrics_port_in_use_refuses_the_start(token: dict[str, Any], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, token)
        cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        r = subprocess.run([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "metrics.listen" in r.stderr and "change [metrics] listen" in r.stderr, r.stderr
    assert "P11_KIT_SERVER_ADDRESS" not in r.stdout  # never announced as serving
    assert not (tmp_path / "p11gate.sock").exists()  # its client socket removed again


def test_audit_write_failures_counted(token: dict[str, Any], tmp_path: Path) -> None:
    # the audit file on a full tmpfs (and its own last page topped up): every write
    # fails with ENOSPC, so each audited call fails closed. (Not /dev/full: the audit
    # file must be a regular file, else the gateway refuses to start.)
    with tmpfs(tmp_path / "auditfs", "256k") as afs:
        audit = afs / "audit.jsonl"
        gw, address = metrics_gateway(tmp_path, token, "127.0.0.1:0",
                                      extra=f'[audit]\nfile = "{audit}"\n')
        try:
            fill(afs)
            with audit.open("ab", buffering=0) as f:
                with contextlib.suppress(OSError):
                    for _ in range(1 << 16):
                        f.write(b"\n")
            c = RawClient(gw.path)
            c.initialize()
            (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
            (sess,) = c.call(ID["C_OpenSession"], [slots[0], 6])
            assert rv_of(c, ID["C_Login"], [sess, 1, PIN.encode()]) == ckr.DEVICE_MEMORY
            assert rv_of(c, ID["C_Login"], [sess, 1, PIN.encode()]) == ckr.DEVICE_MEMORY
            s, _ = scrape(address)
            assert value(s, "p11gate_audit_write_failures_total") == 2
            assert value(s, "p11gate_calls_total", token="signing", call="C_Login",
                         result="CKR_DEVICE_MEMORY") == 2
            c.close()
        finally:
            alive = gw.alive()
            gw.stop()
    assert alive, gw.log()[-3000:]

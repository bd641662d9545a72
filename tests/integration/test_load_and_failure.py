"""Through the real p11-kit-client.so: 100 concurrent connections signing for 10 s, and
a kill -9 of the vendor worker in the middle of a signing loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from tests.gateway_proc import CLIENT_MODULE, Gateway, worker_pids, write_config
from tests.softhsm import make_token

# Forks N children after importing python-pkcs11 but before loading the module: each child
# makes its own C_GetFunctionList, hence its own connection to the gateway.
LOAD_SCRIPT = r'''
import json, os, sys, time
import pkcs11
from pkcs11 import Mechanism, ObjectClass
module, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.time() + 3 + n * 0.02
pids = []
for i in range(n):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        ok = err = 0
        errors = []
        try:
            tok = pkcs11.lib(module).get_token(token_label="signing")
            s = tok.open(user_pin="1234")
            key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x01")
            while time.time() < start:
                time.sleep(0.01)
            end = start + seconds
            while time.time() < end:
                try:
                    key.sign(b"\x11" * 32, mechanism=Mechanism.ECDSA)
                    ok += 1
                except Exception as e:
                    err += 1
                    errors.append(type(e).__name__)
        except Exception as e:
            err += 1
            errors.append("setup:" + type(e).__name__ + ":" + str(e))
        os.write(w, json.dumps({"ok": ok, "err": err, "errors": errors[:5]}).encode())
        os._exit(0)
    os.close(w)
    pids.append((pid, r))
results = []
for pid, r in pids:
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    results.append(json.loads(data or b'{"ok": 0, "err": 1, "errors": ["no report"]}'))
print(json.dumps(results))
'''

KILL_LOOP_SCRIPT = r'''
import json, sys, time
import pkcs11
from pkcs11 import Mechanism, ObjectClass
tok = pkcs11.lib(sys.argv[1]).get_token(token_label="signing")
seconds = float(sys.argv[2])
s = tok.open(user_pin="1234")
key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x01")
pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, id=b"\x01")
ok = ok_after = 0
errors, reopen_errors = [], []
failed = False
print("ready", flush=True)
end = time.time() + seconds
while time.time() < end:
    try:
        sig = key.sign(b"\x22" * 32, mechanism=Mechanism.ECDSA)
        assert pub.verify(b"\x22" * 32, sig, mechanism=Mechanism.ECDSA)
        ok += 1
        ok_after += failed
    except Exception as e:
        errors.append(type(e).__name__)
        failed = True
        # a new session on the same connection: no C_Finalize, no new login (the
        # connection is still logged in)
        while time.time() < end:
            try:
                s = tok.open()
                key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x01")
                pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, id=b"\x01")
                break
            except Exception as e2:
                reopen_errors.append(type(e2).__name__)
                time.sleep(0.05)
print(json.dumps({"ok": ok, "ok_after": ok_after, "errors": errors,
                  "reopen_errors": reopen_errors}), flush=True)
'''


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    token = make_token(tmp_path_factory.mktemp("softhsm"))
    g = Gateway(write_config(tmp_path_factory.mktemp("gw"), token, isolation="process"))
    yield g
    alive = g.alive()
    g.stop()
    assert alive, g.log()[-3000:]


def test_100_connections_sign_for_10_seconds(gw: Gateway) -> None:
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, CLIENT_MODULE, "100", "10"],
                       env=gw.client_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    assert len(results) == 100
    errors = [x for x in results if x["err"]]
    assert not errors, errors[:5]
    assert all(x["ok"] > 0 for x in results), [x["ok"] for x in results]
    total = sum(x["ok"] for x in results)
    print(f"100 connections: {total} signatures in 10 s ({total / 10:.0f}/s), 0 errors")
    assert gw.alive()


def worker_pid(gw: Gateway) -> int:
    found = worker_pids(gw)
    assert len(found) == 1, found
    return found[0]


def test_kill_9_worker_during_signing_loop(gw: Gateway) -> None:
    loop = subprocess.Popen([sys.executable, "-c", KILL_LOOP_SCRIPT, CLIENT_MODULE, "6"],
                            env=gw.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert loop.stdout is not None
    assert loop.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    victim = worker_pid(gw)
    os.kill(victim, signal.SIGKILL)
    out, err = loop.communicate(timeout=60)
    assert loop.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert gw.alive()
    assert worker_pid(gw) != victim
    # only the call(s) in flight at the kill failed; everything after a new session works
    assert 1 <= len(result["errors"]) <= 2, result
    assert set(result["errors"]) <= {"DeviceError", "SessionHandleInvalid"}, result
    assert result["reopen_errors"] == [], result
    assert result["ok_after"] > 10, result

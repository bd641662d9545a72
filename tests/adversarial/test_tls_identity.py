"""Issue 9, point 6 and the first item of point 7: a TLS identity is its certificate's
subject *and CA*; names from certificates never forge log lines; a worker never sees the
backend PIN's variable.

One real gateway with two client CAs (CA A, then CA B with an intermediate), a mapped
token on real SoftHSMv2 logged in with ``backend_pin_env = "HSM_PIN"``, and hostile TLS
clients speaking raw p11-kit RPC frames: certificates of CA B (directly, and through
CA B's intermediate sent by the client) that carry tenant A's subject, and a CA A
certificate whose CN holds a newline. The log is in the text format.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.tls_pki import make_two_ca_pki
from tests.gateway_proc import Gateway, RawClient, rv_of, wait_for, worker_pids
from tests.softhsm import make_token

from p11gate.codec import Attribute, ckr
from p11gate.frontend.pins import hash_pin

C_GetSlotList, C_OpenSession, C_Login, C_CreateObject = 4, 10, 18, 20
CKF_RW, CKF_SERIAL, CKU_USER = 2, 4, 1
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKO_DATA = 0, 1, 2, 3, 0
SUBJECT_A = "CN=tenant-a,O=p11gate tests"
BACKEND_PIN = "Backend-PIN-5150-xyzzy"  # the mapped token's real PIN
A_PIN, B_PIN = "tenant-a-pin-1", "b-app-pin-2"
GATEWAY_SECRET = "gateway-only-secret-8086"  # any other variable of the gateway's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_gateway(base: Path, token: dict[str, Any], pki: dict[str, Any],
                  port: int) -> Path:
    dump = base / "dump-env.sh"  # a custom worker_command: records its environment
    dump.write_text('#!/bin/sh\nout="$1"; shift\n/usr/bin/env > "$out"\nexec "$@"\n')
    dump.chmod(0o755)
    worker = [sys.executable, "-m", "p11gate.cli", "worker", token["module"]]
    command = ", ".join(f'"{w}"' for w in [str(dump), str(base / "custom-env.txt"), *worker])
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = ["unix:path={base / 'gw.sock'}", "tls:127.0.0.1:{port}"]
state_dir = "{base / 'state'}"
log_format = "text"

[audit]
file = "{base / 'audit.jsonl'}"

[tls]
cert = "{pki['server.pem']}"
key = "{pki['server.key']}"
client_ca = "{pki['client_ca']}"

[[backend]]
name = "softhsm"
module = "{token['module']}"
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[backend]]
name = "custom"
module = "{token['module']}"
worker_command = [{command}]
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "{token['label']}" }}
pin_mode = "mapped"
backend_pin_env = "HSM_PIN"
[token.pins]
"cert:{SUBJECT_A}" = "{hash_pin(A_PIN.encode())}"
"cert:{pki['id_b']}/CN=b-app,O=p11gate tests" = "{hash_pin(B_PIN.encode())}"

[[rule]]
name = "tenant-a"
subject = ["{SUBJECT_A}"]
tokens = ["mapped"]
namespace = {{ owned = true }}

[[rule]]
name = "b-app"
issuer = ["{pki['issuer_b']}"]
subject = ["CN=b-app,O=p11gate tests"]
tokens = ["mapped"]
namespace = {{ owned = true }}

[[rule]]
name = "ca-b-others"
issuer = ["CN=Clients CA B,*"]
tokens = ["mapped"]
role = "readonly"
namespace = {{ owned = true }}
""")
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("tlsident")
    pki = make_two_ca_pki(base / "pki")
    token = make_token(base / "softhsm", label="mapped", pin=BACKEND_PIN, keys=False)
    port = free_port()
    cfg = write_gateway(base, token, pki, port)
    gw = Gateway(cfg, env={**os.environ, "HSM_PIN": BACKEND_PIN,
                           "P11GATE_TEST_SECRET": GATEWAY_SECRET})
    yield {"gw": gw, "pki": pki, "port": port, "base": base, "cfg": cfg}
    alive = gw.alive()
    gw.stop()
    assert alive, gw.log()[-3000:]


def connect(setup: dict[str, Any], client: str) -> RawClient:
    pki = setup["pki"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki["ca_a"])
    ctx.load_cert_chain(pki[f"{client}.pem"], pki[f"{client}.key"])
    raw = socket.create_connection(("127.0.0.1", setup["port"]), timeout=10)
    c = RawClient(None, sock=ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
    c.initialize()
    return c


def slots(c: RawClient) -> list[int]:
    (found,) = c.call(C_GetSlotList, [1, 8])
    return list(found)


def data_object(label: bytes) -> list[Attribute]:
    return [Attribute(CKA_CLASS, CKO_DATA, 8), Attribute(CKA_TOKEN, 1, 1),
            Attribute(CKA_PRIVATE, 0, 1), Attribute(CKA_LABEL, label, len(label))]


def test_tenant_a_subject_from_another_ca_is_not_tenant_a(setup: dict[str, Any]) -> None:
    # tenant A (CA A) logs in with its own PIN and makes an object in its namespace
    a = connect(setup, "tenant-a")
    (slot,) = slots(a)
    (s,) = a.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    a.call(C_Login, [s, CKU_USER, A_PIN.encode()])
    a.call(C_CreateObject, [s, data_object(b"a-data")])
    assert len(a.find(s, [Attribute(CKA_LABEL, b"a-data", 6)])) == 1
    a.close()
    # the same subject from CA B, and from CA B's intermediate: not tenant A. It gets
    # only what CA B's rule gives it (readonly: a write-protected token), not A's PIN
    # (that is keyed to A's identity), not A's object (owned by A's identity)
    for forged in ("forged-a", "forged-a-sub"):
        f = connect(setup, forged)
        (fslot,) = slots(f)
        assert rv_of(f, C_OpenSession, [fslot, CKF_SERIAL | CKF_RW]) == \
            ckr.TOKEN_WRITE_PROTECTED, forged
        (fs,) = f.call(C_OpenSession, [fslot, CKF_SERIAL])
        assert rv_of(f, C_Login, [fs, CKU_USER, A_PIN.encode()]) == ckr.PIN_INCORRECT, forged
        assert f.find(fs, [Attribute(CKA_LABEL, b"a-data", 6)]) == [], forged
        assert f.find(fs, [Attribute(CKA_CLASS, CKO_DATA, 8)]) == [], forged
        f.close()
    # the log says which CA each connection came from (the CA before the subject)
    log = setup["gw"].log()
    assert f"ca={setup['pki']['issuer_b']} cert={SUBJECT_A}" in log
    assert f"ca={setup['pki']['issuer_a']} cert={SUBJECT_A}" in log


def test_a_rule_with_issuer_grants_that_cas_client(setup: dict[str, Any]) -> None:
    b = connect(setup, "b-app")
    (slot,) = slots(b)
    (s,) = b.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])  # role user: read/write
    # its PIN is keyed cert:<CA B's id>/<subject>, as the README documents
    b.call(C_Login, [s, CKU_USER, B_PIN.encode()])
    assert rv_of(b, C_CreateObject, [s, data_object(b"b-data")]) == ckr.OK
    assert len(b.find(s, [Attribute(CKA_LABEL, b"b-data", 6)])) == 1
    b.close()


def test_check_config_names_the_cas_and_the_rules_confined_to_the_first(
        setup: dict[str, Any]) -> None:
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config", "--config",
                        str(setup["cfg"])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pki = setup["pki"]
    assert f"client CA #1: {pki['issuer_b']} (id {pki['id_b']}; identity keys " \
           f"cert:{pki['id_b']}/<subject>)" in r.stdout
    assert "rule 'tenant-a': names no issuer" in r.stdout
    # b-app names its CA: it is listed with its issuer, and not among the confined rules
    assert "rule 'b-app': subject=['CN=b-app,O=p11gate tests'] issuer=" in r.stdout
    assert "rule 'b-app': names no issuer" not in r.stdout


def test_a_newline_in_a_cn_does_not_start_a_log_record(setup: dict[str, Any]) -> None:
    gw = setup["gw"]
    e = connect(setup, "evil")
    assert slots(e) == []  # no rule names it
    e.close()
    escaped = "cert=CN=evil\\ninfo    p11gate.server: client connected peer=forged-record"
    assert wait_for(lambda: escaped in gw.log()), gw.log()[-2000:]
    # every line of the log is a record of the gateway's or a traceback's (indented):
    # the CN's second half is not a line of its own
    lines = gw.log().splitlines()
    assert not [ln for ln in lines if ln.startswith("info    p11gate.server: client "
                                                    "connected peer=forged-record")]
    with_cn = [ln for ln in lines if "forged-record" in ln]
    assert with_cn and all(ln.startswith("info    p11gate.conn: client connected conn=")
                           for ln in with_cn), with_cn


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(v.split("=", 1) for v in raw.decode().split("\0") if "=" in v)


def test_workers_never_see_the_backend_pin(setup: dict[str, Any]) -> None:
    gw, base = setup["gw"], setup["base"]
    dumped = base / "custom-env.txt"
    assert wait_for(lambda: dumped.exists() and len(worker_pids(gw)) == 2), gw.log()[-2000:]
    for pid in worker_pids(gw):
        env = _environ(pid)
        assert "HSM_PIN" not in env and "P11GATE_TEST_SECRET" not in env, sorted(env)
        assert BACKEND_PIN not in "".join(env.values())
        assert GATEWAY_SECRET not in "".join(env.values())
        assert env["SOFTHSM2_CONF"]  # what the backend's env gives it
    # the operator's own worker_command sees the same: what it needs, no PIN
    text = dumped.read_text()
    assert BACKEND_PIN not in text and "HSM_PIN" not in text and GATEWAY_SECRET not in text
    assert "SOFTHSM2_CONF=" in text and "PATH=" in text
    # and the mapped token works: the gateway itself did read HSM_PIN to log in
    a = connect(setup, "tenant-a")
    (slot,) = slots(a)
    (s,) = a.call(C_OpenSession, [slot, CKF_SERIAL])
    assert rv_of(a, C_Login, [s, CKU_USER, A_PIN.encode()]) == ckr.OK
    a.close()

"""Review 2026-12-08: C_SetOperationState reached the module unrecorded.

C_SetOperationState(session, state, encryption key, authentication key) starts an
operation again, with the keys it names: a key use. The gateway forwarded it as a plain
session call, so no audit record said it happened, and with the audit log full (``[audit]
required``, fail closed) it still went to the module; a module that restores operation
states (SoftHSM does not: it answers CKR_FUNCTION_NOT_SUPPORTED, which shows the call
got there) would have started an unaudited signing or decryption. Now it is recorded
before it runs (``PENDING``, then its result) and refused when that record cannot be
written, without reaching the module.

Real gateway over SoftHSM (worker process) and the built-in soft token, the audit log on
a small tmpfs filled to the last byte, raw frames.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.fail_closed_env import fill, tmpfs
from tests.adversarial.hostile import (
    CKA_ENCRYPT,
    CKA_TOKEN,
    CKA_VALUE_LEN,
    CKF_RW,
    CKF_SERIAL,
    CKM_AES_KEY_GEN,
    CKU_USER,
    b,
    call,
    rv,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient
from tests.soft_token import make_soft_token
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr

PIN = "1234"
CKM_BOGUS = 0x80001234  # a vendor mechanism: the module refuses the Init


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("opstate")
    tok = make_token(base / "softhsm", label="hsm", pin=PIN, keys=False)
    soft = make_soft_token(base / "soft", label="soft", pin=PIN, keys=False)
    with tmpfs(base / "auditfs", "256k") as afs:
        cfg = base / "p11gate.toml"
        cfg.write_text(f"""
[server]
listen = "unix:path={base / 'gw.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"

[audit]
file = "{afs / 'audit.jsonl'}"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[backend]]
name = "soft"
type = "soft"
path = "{soft['path']}"

[[token]]
name = "hsm"
backend = "softhsm"
select = {{ label = "hsm" }}

[[token]]
name = "soft"
backend = "soft"
select = {{ label = "soft" }}
""")
        gw = Gateway(cfg)
        yield {"gw": gw, "audit": afs / "audit.jsonl"}
        stop_gateway(gw)


def sessions(gw: Gateway) -> tuple[RawClient, list[tuple[int, int]]]:
    """A logged-in session on each token, and an AES key made on it."""
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    out = []
    for slot in slots:
        (sess,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
        assert rv(c, "C_Login", sess, CKU_USER, PIN.encode()) == ckr.OK
        (key,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                      [u(CKA_VALUE_LEN, 16), b(CKA_TOKEN, False), b(CKA_ENCRYPT, True)])
        out.append((sess, key))
    return c, out


def records(path: Path, op: str) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line]  # (see top_up)
    return [r for r in map(json.loads, lines) if r["op"] == op]


def top_up(path: Path) -> None:
    """Fill what is left of the audit file's last page with newlines: a record shorter
    than the failed ones (a PENDING record is) would otherwise still fit there."""
    with path.open("ab", buffering=0) as f:
        for _ in range(1 << 16):
            try:
                f.write(b"\n")
            except OSError:
                return
    pytest.fail("the audit file system never filled up")


def test_operation_state_is_audited_before_it_runs(env: dict[str, Any]) -> None:
    c, sess = sessions(env["gw"])
    for s, key in sess:
        # the module's own answer (SoftHSM and the soft token keep no operation state)
        assert rv(c, "C_SetOperationState", s, b"\0" * 32, key, 0) \
            == ckr.FUNCTION_NOT_SUPPORTED
    got = records(env["audit"], "C_SetOperationState")
    assert [r["result"] for r in got] == ["PENDING", "CKR_FUNCTION_NOT_SUPPORTED"] * 2
    assert [r["token"] for r in got] == ["hsm", "hsm", "soft", "soft"]
    assert all(r["object"] for r in got)  # the key (its handle: a session key made here)
    c.close()


def test_an_operation_state_the_audit_cannot_record_is_not_restored(
        env: dict[str, Any]) -> None:
    gw, audit = env["gw"], env["audit"]
    c, sess = sessions(gw)
    filler = fill(audit.parent)
    try:
        # the audit file's last page has room for a few records: failed key uses fill
        # it (they are recorded best effort) until a record cannot be written
        s0, key0 = sess[0]
        for _ in range(200):
            assert rv(c, "C_EncryptInit", s0, Mechanism(CKM_BOGUS, None), key0) != ckr.OK
            if any(r.get("msg") == "cannot write the audit log" for r in gw.records()):
                break
        else:
            pytest.fail("the audit log never filled up")
        top_up(audit)
        size = audit.stat().st_size
        for s, key in sess:
            # refused before the module: not CKR_FUNCTION_NOT_SUPPORTED
            assert rv(c, "C_SetOperationState", s, b"\0" * 32, key, 0) == ckr.DEVICE_MEMORY
            assert rv(c, "C_SetOperationState", s, b"\0" * 32, 0, 0) == ckr.DEVICE_MEMORY
        assert audit.stat().st_size == size
    finally:
        filler.unlink()
    # room again: recorded and forwarded
    s0, key0 = sess[0]
    assert rv(c, "C_SetOperationState", s0, b"\0" * 32, key0, 0) \
        == ckr.FUNCTION_NOT_SUPPORTED
    assert records(audit, "C_SetOperationState")[-1]["result"] == \
        "CKR_FUNCTION_NOT_SUPPORTED"
    c.close()

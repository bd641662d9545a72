"""Review 2026-12-08 (found clean, kept as a regression test): what the gateway writes
is private whatever umask it is started with.

A gateway started with umask 000 (a careless unit file or shell) over SoftHSM, with a
mapped token whose PIN comes from ``backend_pin_env``, a log file, an audit file
outside the state directory and a metrics socket: after a mapped login and a C_SetPIN
(a registry write) every file it made is 0600, every directory 0700, the sockets are
what their settings say, the registry holds the new PIN only as a hash, and the worker's
environment and command line have no PIN.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.adversarial.hostile import CKF_RW, CKF_SERIAL, CKU_USER, call, rv
from tests.gateway_proc import Gateway, RawClient, worker_pids
from tests.softhsm import make_token

from p11gate.codec import ckr
from p11gate.frontend.pins import hash_pin

BACKEND_PIN = "umask-backend-PIN-5"
OWN_PIN = "umask-own-PIN-5"
NEW_PIN = "umask-new-PIN-5"


def test_files_are_private_under_umask_000(tmp_path: Path) -> None:
    tok = make_token(tmp_path / "softhsm", label="mapped", pin=BACKEND_PIN, keys=False)
    logs = tmp_path / "logs"  # the operator's (log_file's directory must exist)
    logs.mkdir(mode=0o755)
    cfg = tmp_path / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={tmp_path / 'gw.sock'}"
state_dir = "{tmp_path / 'state'}"
log_file = "{logs / 'p11gate.log'}"
log_level = "debug"

[audit]
file = "{logs / 'audit' / 'audit.jsonl'}"

[metrics]
listen = "unix:path={tmp_path / 'metrics.sock'}"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
pin_mode = "mapped"
backend_pin_env = "P11GATE_TEST_HSM_PIN"
pins = {{ "uid:0" = "{hash_pin(OWN_PIN.encode())}" }}
""")
    old = os.umask(0)
    try:
        gw = Gateway(cfg, env={**os.environ, "P11GATE_TEST_HSM_PIN": BACKEND_PIN})
    finally:
        os.umask(old)
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
        assert rv(c, "C_Login", sess, CKU_USER, OWN_PIN.encode()) == ckr.OK
        assert rv(c, "C_SetPIN", sess, OWN_PIN.encode(), NEW_PIN.encode()) == ckr.OK
        workers = worker_pids(gw)
        assert workers
        for pid in workers:
            for what in ("environ", "cmdline"):
                seen = Path(f"/proc/{pid}/{what}").read_bytes()
                assert BACKEND_PIN.encode() not in seen, what
        modes = {}
        state = tmp_path / "state"
        modes[state] = stat.S_IMODE(state.stat().st_mode)
        for root in (state, logs):
            for p in root.rglob("*"):
                modes[p] = stat.S_IMODE(p.lstat().st_mode)
        for sock in ("gw.sock", "metrics.sock"):
            modes[tmp_path / sock] = stat.S_IMODE((tmp_path / sock).stat().st_mode)
        c.close()
    finally:
        gw.stop()
    made = {p: m for p, m in modes.items() if p.name not in ("gw.sock", "metrics.sock")}
    assert made and all(m == (0o700 if p.is_dir() else 0o600) for p, m in made.items()), made
    assert modes[tmp_path / "gw.sock"] == 0o660  # socket_mode's default
    assert modes[tmp_path / "metrics.sock"] == 0o600
    registry = (tmp_path / "state" / "registry.sqlite3").read_bytes()
    for pin in (BACKEND_PIN, OWN_PIN, NEW_PIN):
        assert pin.encode() not in registry
        assert pin not in (logs / "p11gate.log").read_text()

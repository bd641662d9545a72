"""Issue 10, points 5, 6 and 9: faults an operator meets.

Two starts on one state directory or one socket, a kill -9 that leaves files behind,
SIGHUP from logrotate / `systemctl reload`, and permissions: the state directory and
everything in it private, `socket_mode` read as the octal it is written in, and risky
settings named by `check-config` and `serve`. Every gateway is a real `p11gate serve`
subprocess over a real SoftHSMv2 token; clients speak raw RPC frames.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tests.gateway_proc import Gateway, RawClient, wait_for, worker_pids, write_config
from tests.policy.tenants import CKF_SERIAL, CKU_USER, C_GetSlotList, C_Login, C_OpenSession
from tests.softhsm import make_token

C_Logout, C_CloseSession = 19, 13


def p11gate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def slots(path: str) -> list[int]:
    c = RawClient(path)
    try:
        c.initialize()
        (found,) = c.call(C_GetSlotList, [1, 16])
        return list(found)
    finally:
        c.close()


def status(cfg: Path) -> dict[str, Any]:
    r = p11gate("status", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def with_server_keys(cfg: Path, keys: str) -> None:
    """Add lines to the [server] table of a config written by write_config."""
    cfg.write_text(cfg.read_text().replace("[server]\n", f"[server]\n{keys}\n", 1))


# --- point 5: one gateway per state directory and per socket -------------------------


def test_second_serve_on_the_same_state_dir_is_refused_and_the_first_keeps_serving(
        tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    first = Gateway(cfg)
    try:
        sock, admin = Path(first.path), tmp_path / "state" / "admin.sock"
        inodes = (sock.stat().st_ino, admin.stat().st_ino)
        t0 = time.monotonic()
        r = p11gate("serve", "--config", str(cfg))
        refused_in = time.monotonic() - t0
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert str(tmp_path / "state") in lines[0] and f"pid {first.proc.pid}" in lines[0]
        assert "P11_KIT_SERVER_ADDRESS" not in r.stdout
        # the first one's files are untouched and it still serves, raw RPC and status
        assert (sock.stat().st_ino, admin.stat().st_ino) == inodes
        assert len(slots(first.path)) == 1
        assert status(cfg)["tokens"][0]["present"] is True
        assert first.alive()
        print(f"second serve refused in {refused_in:.2f} s")
    finally:
        assert first.stop() == 0


def test_a_socket_another_live_gateway_answers_on_is_never_taken_over(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    first = Gateway(cfg)
    try:
        sock = Path(first.path)
        ino = sock.stat().st_ino
        # same listen socket, its own state directory (so the lock does not stop it)
        other = tmp_path / "other.toml"
        other.write_text(cfg.read_text().replace(f"{tmp_path / 'state'}",
                                                 f"{tmp_path / 'state2'}"))
        r = p11gate("serve", "--config", str(other))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert str(sock) in r.stderr and f"pid {first.proc.pid}" in r.stderr, r.stderr
        assert sock.stat().st_ino == ino
        # same admin socket, its own listen socket: refused too, and the socket it had
        # already bound is removed, the first one's admin socket is not
        admin = tmp_path / "state" / "admin.sock"
        third = tmp_path / "third.toml"
        third.write_text(other.read_text().replace(f"{sock}", f"{tmp_path / 'third.sock'}")
                         .replace("[server]\n", f'[server]\nadmin_socket = "{admin}"\n', 1))
        r = p11gate("serve", "--config", str(third))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "admin socket" in r.stderr and f"pid {first.proc.pid}" in r.stderr, r.stderr
        assert not (tmp_path / "third.sock").exists()
        assert admin.exists() and sock.stat().st_ino == ino
        assert len(slots(first.path)) == 1
        assert status(cfg)["connections"] >= 0
    finally:
        assert first.stop() == 0
    assert not sock.exists(), "the first gateway removes its own socket when it stops"


def test_a_kill_9_leaves_files_that_the_next_start_replaces(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    gw = Gateway(cfg)
    workers = worker_pids(gw)
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    gw.stop()
    for pid in workers:  # they see EOF on their pipe and exit; make sure of it
        try:
            psutil.Process(pid).wait(10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
    sock, lock = Path(gw.path), tmp_path / "state" / "lock"
    assert stat.S_ISSOCK(os.lstat(sock).st_mode), "the dead gateway's socket is left"
    assert lock.read_text().strip() == str(gw.proc.pid)
    again = Gateway(cfg)
    try:
        assert lock.read_text().strip() == str(again.proc.pid)
        assert len(slots(again.path)) == 1
        assert status(cfg)["tokens"][0]["present"] is True
    finally:
        assert again.stop() == 0


def test_a_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    squatter = tmp_path / "p11gate.sock"
    squatter.write_text("precious\n")
    r = p11gate("serve", "--config", str(cfg))
    assert r.returncode == 2
    assert "is not a socket" in r.stderr and str(squatter) in r.stderr, r.stderr
    assert squatter.read_text() == "precious\n"


# --- point 6: SIGHUP ----------------------------------------------------------------


def test_sighup_reopens_logs_and_audit_and_never_kills(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    log_file, audit = tmp_path / "gw.log", tmp_path / "state" / "audit.jsonl"
    with_server_keys(cfg, f'log_file = "{log_file}"')
    gw = Gateway(cfg)
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slot,) = c.call(C_GetSlotList, [1, 16])[0]

        def login_once() -> None:
            (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
            c.call(C_Login, [s, CKU_USER, token["pin"].encode()])
            c.call(C_Logout, [s])
            c.call(C_CloseSession, [s])

        login_once()
        assert wait_for(lambda: audit.exists() and audit.read_text().count("\n") == 1)
        # logrotate: rename, then SIGHUP (three times: reload, rotate, reload)
        os.rename(log_file, tmp_path / "gw.log.1")
        os.rename(audit, tmp_path / "audit.jsonl.1")
        for _ in range(3):
            os.kill(gw.proc.pid, signal.SIGHUP)
            time.sleep(0.2)
        assert wait_for(lambda: log_file.exists()
                        and log_file.read_text().count("SIGHUP: reopened logs") == 3)
        assert gw.alive()
        login_once()  # the same connection goes on
        assert len(slots(gw.path)) == 1  # and new ones are served
        # the new file holds the login and each reload's two records (PENDING, outcome):
        # the file is reopened before the reload is audited, so none reach the old one
        def records() -> list[dict[str, object]]:
            return [json.loads(line) for line in audit.read_text().splitlines()]

        assert wait_for(lambda: audit.exists() and len(records()) == 1 + 3 * 2)
        logins = [r for r in records() if r["op"] == "C_Login"]
        assert len(logins) == 1 and logins[0]["result"] == "CKR_OK"
        reloads = [r for r in records() if r["op"] == "reload"]
        assert [r["result"] for r in reloads] == ["PENDING", "CKR_OK"] * 3, reloads
        assert {r["identity"] for r in reloads} == {"SIGHUP"}
        assert (tmp_path / "audit.jsonl.1").read_text().count("\n") == 1
        assert mode(audit) == 0o600
        assert status(cfg)["audit_records"] == 2 + 3 * 2  # the count goes on across the reopen
        c.close()
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        hup = [r for r in records if r["msg"].startswith("SIGHUP")]
        assert "reloading the configuration" in hup[0]["msg"]
        assert str(log_file) in hup[0]["reopened"] and str(audit) in hup[0]["reopened"]
    finally:
        assert gw.stop() == 0
    assert not Path(gw.path).exists()


# --- point 9: permissions and risky configurations ----------------------------------


def test_state_dir_and_its_files_are_private_after_a_real_serve(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    state = tmp_path / "state"
    gw = Gateway(cfg)
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slot,) = c.call(C_GetSlotList, [1, 16])[0]
        (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
        c.call(C_Login, [s, CKU_USER, token["pin"].encode()])  # an audit record
        c.close()
        assert wait_for(lambda: (state / "audit.jsonl").exists())
        assert mode(state) == 0o700
        names = {p.name: mode(p) for p in state.iterdir()}
        for name in ("registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm",
                     "audit.jsonl", "lock"):
            assert names.get(name) == 0o600, (name, names)
        assert names["admin.sock"] == 0o600
        assert mode(Path(gw.path)) == 0o660  # the configured socket_mode, nothing else
        assert not [n for n, m in names.items() if m & 0o077], names
    finally:
        assert gw.stop() == 0
    # a state directory left open (an older version, a careless copy) is closed, with a
    # warning in the log
    state.chmod(0o755)
    (state / "registry.sqlite3").chmod(0o644)
    (state / "audit.jsonl").chmod(0o666)
    (state / "extra").mkdir(mode=0o755)
    (state / "extra" / "notes").write_text("x")
    (state / "extra" / "notes").chmod(0o644)
    gw = Gateway(cfg)
    try:
        for p in (state, state / "extra"):
            assert mode(p) == 0o700, p
        for p in (state / "registry.sqlite3", state / "audit.jsonl", state / "extra" / "notes"):
            assert mode(p) == 0o600, p
        warned = [r for r in gw.records() if r["msg"].startswith("state directory was open")]
        assert len(warned) == 1 and warned[0]["count"] == 5, warned
    finally:
        assert gw.stop() == 0


def test_demo_token_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "p11gate.cli", "serve", "--state-dir",
                             str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("P11_KIT_SERVER_ADDRESS=")
        opened = [p for p in state.rglob("*") if not p.is_socket() and mode(p) & 0o077]
        assert not opened, [(str(p), oct(mode(p))) for p in opened]
        assert (state / "demo-token.db").stat().st_size > 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _risky_base(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    return cfg, token


def _rule(everyone: bool = False, role: str = "user", allow: str = "") -> str:
    who = "everyone = true" if everyone else "uid = [1001]"
    return (f'\n[[rule]]\nname = "r"\n{who}\ntokens = ["*"]\nrole = "{role}"\n'
            + (f"allow = {allow}\n" if allow else ""))


def test_check_config_names_each_risky_setting_in_one_line(tmp_path: Path) -> None:
    cfg, _ = _risky_base(tmp_path)
    base = cfg.read_text()

    def warnings(text: str) -> list[str]:
        cfg.write_text(text)
        r = p11gate("check-config", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith("warnings)") or "warning" not in r.stderr
        return [line for line in r.stderr.splitlines() if line.startswith("warning: ")]

    # a safe configuration: no warning at all
    assert warnings(base + _rule()) == []
    (w,) = warnings(base)
    assert "no [[rule]]" in w and "security officer on every token" in w and "add [[rule]]" in w
    (w,) = warnings(base + _rule(everyone=True, role="officer"))
    assert "everyone = true" in w and "officer" in w and "readonly" in w
    (w,) = warnings(base + _rule(everyone=True, allow='["use", "so"]'))
    assert "rule[0] (r)" in w and "everyone = true" in w
    assert warnings(base + _rule(everyone=True, role="user")) == []
    cfg_open = base.replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n") + _rule()
    (w,) = warnings(cfg_open)
    assert "socket_mode = 0o666" in w and "every local user can connect" in w and "0o660" in w
    shared = Path(tempfile.mkdtemp(prefix="p11gate-ww-", dir=tmp_path))
    shared.chmod(0o777)
    (w,) = warnings(base.replace(str(tmp_path / "p11gate.sock"), str(shared / "gw.sock"))
                    + _rule())
    assert f"socket directory {shared} is world-writable" in w and "replace" in w


def test_a_pin_file_others_can_read_is_refused_by_check_config_and_serve(
        tmp_path: Path) -> None:
    cfg, token = _risky_base(tmp_path)
    pin = tmp_path / "hsm.pin"
    pin.write_text(token["pin"] + "\n")
    pin.chmod(0o644)
    cfg.write_text(cfg.read_text().replace(
        'select = { label',
        f'pin_mode = "none"\nbackend_pin_file = "{pin}"\nselect = {{ label', 1) + _rule())
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert str(pin) in line and f"chmod 600 {pin}" in line and "0644" in line
    assert token["pin"] not in r.stdout + r.stderr
    r = p11gate("serve", "--config", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"chmod 600 {pin}" in r.stderr and "P11_KIT_SERVER_ADDRESS" not in r.stdout
    assert not (tmp_path / "p11gate.sock").exists()
    pin.chmod(0o600)
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_serve_logs_the_risky_settings_as_warnings(tmp_path: Path) -> None:
    cfg, _ = _risky_base(tmp_path)
    with_server_keys(cfg, "socket_mode = 0o666")
    gw = Gateway(cfg)
    try:
        assert mode(Path(gw.path)) == 0o666
        warned = [r["msg"] for r in gw.records() if r["level"] == "warning"]
        assert any("no [[rule]]" in m for m in warned), warned
        assert any("every local user can connect" in m for m in warned), warned
    finally:
        assert gw.stop() == 0


def test_socket_mode_as_an_octal_string_is_what_the_socket_gets(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    with_server_keys(cfg, 'socket_mode = "0600"')
    gw = Gateway(cfg)
    try:
        assert mode(Path(gw.path)) == 0o600  # today: decimal 600 = 0o1130
        assert len(slots(gw.path)) == 1
    finally:
        assert gw.stop() == 0
    cfg.write_text(cfg.read_text().replace('socket_mode = "0600"', "socket_mode = 600"))
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2 and "server.socket_mode" in r.stderr and "0o600" in r.stderr

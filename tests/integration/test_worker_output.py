"""Errors where the operator looks: what a worker writes to stderr (the loader's error, a
vendor module's messages) becomes structured log records with the backend and worker
pid, the loader's error is the backend's last_error in `p11gate status`, and a module
that never loads is retried with back-off and summarised, not logged every few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import Gateway, RawClient, wait_for, write_config
from tests.softhsm import make_token

from p11gate.backends.worker_output import LINE_BURST, MAX_LINE

C_GetSlotList = 4


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_token(tmp_path_factory.mktemp("softhsm"))


def _not_pkcs11_module(base: Path) -> Path:
    """A real shared library, but not a PKCS#11 module: no C_GetFunctionList."""
    src = base / "notp11.c"
    src.write_text("int not_a_pkcs11_function(void) { return 42; }\n")
    lib = base / "libnotp11.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def _status(cfg: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "p11gate.cli", "status", "--config", str(cfg)]
    helptext = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True).stdout
    if "--json" in helptext:  # a human table by default, JSON on request
        cmd.append("--json")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_loader_error_is_logged_in_status_and_restarts_back_off(tmp_path: Path) -> None:
    lib = _not_pkcs11_module(tmp_path)
    cfg = write_config(tmp_path, {"module": str(lib), "conf": "/nonexistent",
                                  "label": "none"})
    gw = Gateway(cfg)
    try:
        start = time.monotonic()
        # the worker's own line, as a record of the gateway's log with backend and pid
        assert wait_for(lambda: any(r.get("msg") == "worker output" for r in gw.records()),
                        20), gw.log()
        out = [r for r in gw.records() if r.get("msg") == "worker output"]
        assert "is not a PKCS#11 module (no C_GetFunctionList)" in out[0]["line"]
        assert out[0]["backend"] == "softhsm" and isinstance(out[0]["pid"], int)
        assert out[0]["level"] == "warning"
        # and the reason is in status
        (backend,) = _status(cfg)["backends"]
        assert "no C_GetFunctionList" in backend["last_error"], backend
        # let it keep failing for a while
        time.sleep(max(0.0, 12.0 - (time.monotonic() - start)))
        records = gw.records()
        assert gw.alive()
    finally:
        gw.stop()
    restarts = [r for r in records if r.get("msg") == "backend restart failed"]
    # the worker reason is in every restart-failure record
    assert restarts and all("no C_GetFunctionList" in r["reason"] for r in restarts)
    # 0.2 s restart delay doubling: ~6 attempts in 12 s; at most 3 are logged one by one
    assert len(restarts) <= 3, restarts
    lines = [r for r in records if r.get("msg") == "worker output"]
    assert len(lines) <= 4, lines
    waits = [r["next_try_in"] for r in restarts]
    assert waits == sorted(waits) and waits[-1] > waits[0], waits  # backing off
    assert any("summarised" in str(r.get("msg")) for r in records)


def test_chatty_worker_is_bounded_and_still_served(token: dict, tmp_path: Path) -> None:
    """A worker (an operator's worker_command, a vendor module) that floods stderr with
    a huge line and many short ones: bounded records, and the backend is still served."""
    flood = (
        "python3 -c \"import sys; sys.stderr.write('A' * 300000 + '\\n'); "
        "[sys.stderr.write(f'noise {i}\\n') for i in range(5000)]\"; "
        f"exec {sys.executable} -m p11gate.cli worker {token['module']}"
    )
    cfg = write_config(tmp_path, token,
                       extra_backend=f"worker_command = ['sh', '-c', {json.dumps(flood)}]")
    gw = Gateway(cfg)
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = c.call(C_GetSlotList, [1, 16])
        assert len(slots) == 1
        c.close()
        assert wait_for(lambda: any("not logged one by one" in str(r.get("msg"))
                                    for r in gw.records()), 10), gw.log()[-3000:]
        records = gw.records()
    finally:
        gw.stop()
    lines = [r for r in records if r.get("msg") == "worker output"]
    assert lines and all(len(r["line"]) <= MAX_LINE + 1 for r in lines)
    assert lines[0]["line"].startswith("AAAA")
    assert len(lines) <= 3 * LINE_BURST, len(lines)  # 5001 lines written
    dropped = sum(r["count"] for r in records if "not logged one by one" in str(r.get("msg")))
    assert dropped + len(lines) >= 5001 - LINE_BURST  # counted, not silently lost

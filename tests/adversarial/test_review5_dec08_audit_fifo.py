"""The audit file replaced by a FIFO (or a symbolic link to one, or to a device): the
reopen on SIGHUP ran open() on the event loop, and open() of a FIFO for writing waits
for a reader, so the whole gateway stopped answering, every tenant, until someone read
the FIFO (which would then have been handed the records). The file is now opened
without blocking and checked to be a regular file; anything else is refused, and
refused closed: every audited call (key use among them) fails, as on a full disk, until
a SIGHUP finds a regular file there again. At start, such a path stops `serve` with one
line instead of hanging it.

Raw frames, a real gateway over SoftHSM (worker process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.adversarial.hostile import call, rv
from tests.gateway_proc import Gateway, RawClient, signer, wait_for, write_config
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr

CKM_ECDSA = 0x1041


def _fifo(audit: Path, tmp: Path) -> None:
    os.mkfifo(audit, 0o600)


def _link_to_fifo(audit: Path, tmp: Path) -> None:
    os.mkfifo(tmp / "elsewhere.fifo", 0o600)
    audit.symlink_to(tmp / "elsewhere.fifo")


def _link_to_device(audit: Path, tmp: Path) -> None:
    audit.symlink_to("/dev/null")


REPLACEMENTS: dict[str, Callable[[Path, Path], None]] = {
    "fifo": _fifo, "symlink-to-fifo": _link_to_fifo, "symlink-to-device": _link_to_device}


def _timed(c: RawClient, name: str, *args: object) -> float:
    t0 = time.monotonic()
    call(c, name, *args)
    return time.monotonic() - t0


@pytest.mark.parametrize("kind", list(REPLACEMENTS))
def test_audit_file_replaced_by_a_fifo_neither_blocks_nor_lets_key_use_through(
        tmp_path: Path, kind: str) -> None:
    token = make_token(tmp_path / "hsm", label="signing")
    gw = Gateway(write_config(tmp_path, token))
    audit = tmp_path / "state" / "audit.jsonl"
    try:
        c, sess, key = signer(gw.path)
        c.sock.settimeout(5)
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), key) == ckr.OK
        assert rv(c, "C_Sign", sess, b"\x07" * 32, 64) == ckr.OK
        # the audit file is swapped for something that is not a regular file
        audit.rename(audit.with_suffix(".1"))
        REPLACEMENTS[kind](audit, tmp_path)
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.5)  # the signal is handled
        # the gateway answers on, at once: this connection and a new one (before: the
        # event loop sat in open() of the FIFO, and these calls timed out)
        c.sock.settimeout(3)
        worst = max(_timed(c, "C_GenerateRandom", sess, 16),
                    _timed(c, "C_GetSlotList", 1, 8))
        other = RawClient(gw.path)
        other.sock.settimeout(3)
        other.initialize()
        worst = max(worst, _timed(other, "C_GetSlotList", 1, 8))
        print(f"\n{kind}: slowest call after the SIGHUP {worst * 1000:.1f} ms")
        assert worst < 1.0
        assert wait_for(lambda: "the audit file is not a regular file" in gw.log(), 5), \
            gw.log()[-3000:]
        # key use is refused while no record can be written (fail closed)
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), key) == ckr.DEVICE_ERROR
        assert rv(c, "C_Sign", sess, b"\x07" * 32, 64) == ckr.OPERATION_NOT_INITIALIZED
        # a regular file again, another SIGHUP: key use works, and is recorded there
        audit.unlink()
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: audit.is_file(), 5)
        assert wait_for(lambda: rv(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None),
                                   key) == ckr.OK, 5)
        assert rv(c, "C_Sign", sess, b"\x07" * 32, 64) == ckr.OK
        assert '"op":"C_SignInit"' in audit.read_text()
        other.close()
        c.close()
    finally:
        gw.stop()


def test_serve_refuses_an_audit_path_that_is_a_fifo(tmp_path: Path) -> None:
    token = make_token(tmp_path / "hsm", label="signing")
    cfg = write_config(tmp_path, token)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / "audit.jsonl", 0o600)
    try:
        r = subprocess.run([sys.executable, "-m", "p11gate.cli", "serve", "--config",
                            str(cfg)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve hung opening the FIFO")  # before: open() waited for a reader
    assert r.returncode == 2, r.stderr
    assert "not a regular file" in r.stderr and "audit.jsonl" in r.stderr, r.stderr

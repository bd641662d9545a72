"""Worker supervision: a hung worker misses its deadline, is killed and restarted; the
client sees an error for the call that was in flight and works again after opening a
new session, without C_Finalize."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.gateway_proc import Gateway, wait_for, worker_pids, write_config
from tests.robustness.test_malformed import good_client, sign_once

from p11gate.codec import Attribute, ReplyError, ckr


@pytest.fixture()
def process_gateway(token: dict, tmp_path: Path) -> Iterator[Gateway]:
    cfg = write_config(tmp_path, token, isolation="process")
    cfg.write_text(cfg.read_text().replace("call_timeout = 5.0", "call_timeout = 1.5"))
    gw = Gateway(cfg)
    yield gw
    assert gw.alive(), gw.log()[-3000:]
    gw.stop()



def test_hung_worker_is_killed_and_replaced(process_gateway: Gateway) -> None:
    gw = process_gateway
    c, sess, key = good_client(gw)
    sign_once(c, sess, key)
    (pid,) = worker_pids(gw)
    os.kill(pid, signal.SIGSTOP)  # a hang, as a stuck HSM driver would
    try:
        assert wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5)
        t0 = time.monotonic()
        with pytest.raises(ReplyError) as e:
            sign_once(c, sess, key)
            pytest.fail(f"signed with worker {pid} stopped; workers now {worker_pids(gw)}; "
                        f"log: {gw.log()[-3000:]}")
        elapsed = time.monotonic() - t0
        assert e.value.rv == ckr.DEVICE_ERROR
        assert 1.0 < elapsed < 6.0, f"deadline not applied: {elapsed:.1f}s"
    finally:
        with contextlib.suppress(ProcessLookupError):  # normally already killed
            os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: worker_pids(gw) not in ([], [pid]), 10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # the old session died with the worker; a new one works, login restored
    with pytest.raises(ReplyError) as e:
        c.call(64, [sess, 16])
    assert e.value.rv == ckr.SESSION_HANDLE_INVALID
    # the replacement starts SoftHSM and logs in again: seconds on a loaded machine
    assert wait_for(lambda: _backend_up(gw) >= 2, 60), gw.log()[-3000:]
    c2, sess2, key2 = good_client(gw, timeout=60)
    sign_once(c2, sess2, key2)
    c.close()
    c2.close()
    assert "missed its" in gw.log() or "deadline" in gw.log()


def _backend_up(gw: Gateway) -> int:
    return sum(1 for r in gw.records() if r.get("msg") == "backend up")


def test_crashed_worker_restarts(process_gateway: Gateway) -> None:
    gw = process_gateway
    c, _sess, _key = good_client(gw)
    (pid,) = worker_pids(gw)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(worker_pids(gw)) == 1 and worker_pids(gw) != [pid], 10)
    # same connection, no C_Finalize: a new session works, the login survived
    (slots,) = c.call(4, [1, 8])
    (sess2,) = c.call(10, [slots[0], 6])
    info = c.call(13, [sess2])
    assert info[1] == 3  # CKS_RW_USER_FUNCTIONS: still logged in
    c.call(26, [sess2, []])
    c.call(27, [sess2, 16])
    c.call(28, [sess2])
    c.close()
    c3, s3, k3 = good_client(gw)
    sign_once(c3, s3, k3)
    c3.close()


def test_token_object_handles_survive_a_worker_restart(process_gateway: Gateway) -> None:
    """A key handle obtained before the worker died still names the same key after it
    was restarted (found again by CKA_CLASS/CKA_ID/CKA_LABEL); session objects do not."""
    gw = process_gateway
    c, sess, key = good_client(gw)
    sig_before = sign_once(c, sess, key)
    # a session object, which dies with the backend instance
    (tmp,) = c.call(20, [sess, [Attribute(0, 0, 8), Attribute(1, 0, 1),
                                Attribute(3, b"scratch", 7)]])
    time.sleep(0.2)  # identities are recorded in the background
    (pid,) = worker_pids(gw)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(worker_pids(gw)) == 1 and worker_pids(gw) != [pid], 10)
    (slots,) = c.call(4, [1, 8])
    (sess2,) = c.call(10, [slots[0], 6])
    sig_after = sign_once(c, sess2, key)  # the old handle, a new session
    assert len(sig_after) == len(sig_before) == 64
    with pytest.raises(ReplyError) as e:
        c.call(22, [sess2, tmp])
    assert e.value.rv == ckr.OBJECT_HANDLE_INVALID
    c.close()

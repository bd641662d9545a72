"""A pool keeps the Update calls of a multi-part operation so that it can replay them on
another member, at most ``replay_buffer`` bytes of them. Only the data was counted: an
empty part counted nothing, so one client's C_DigestUpdate(b"") calls piled up without
end in the gateway (each kept part costs a list, a tuple and a slot whatever its size),
and a failover replayed every one of them. Empty and small parts now count what keeping
them costs; past the bound the operation is no longer replayable (CKR_DEVICE_ERROR on
failover, as documented).

Raw frames, a real gateway over a two-member SoftHSM pool with ``replay_buffer = 4096``,
members' workers killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
from tests.adversarial.hostile import CKF_RW, CKF_SERIAL, CKM_SHA256, call, pipeline, rv
from tests.gateway_proc import Gateway, RawClient, wait_for, worker_pids
from tests.pools.members import make_member, pool_config

from p11gate.codec import Mechanism, ckr

PARTS = 1000  # empty parts: 0 bytes of data, far more than 4096 bytes kept


def _worker_of(gw: Gateway, conf: str) -> int | None:
    for pid in worker_pids(gw):
        try:
            if psutil.Process(pid).environ().get("SOFTHSM2_CONF") == conf:
                return pid
        except psutil.Error:
            continue
    return None


def test_empty_update_parts_count_against_the_replay_buffer(tmp_path: Path) -> None:
    members = [make_member(tmp_path, i, None) for i in range(2)]
    cfg = pool_config(tmp_path, members, extra_pool="replay_buffer = 4096")
    gw = Gateway(cfg)
    c = RawClient(gw.path)
    try:
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
        call(c, "C_DigestInit", sess, Mechanism(CKM_SHA256, None))
        assert pipeline(c, [("C_DigestUpdate", [sess, b""])] * PARTS) == [0] * PARTS

        # whichever member holds the operation dies once: the operation must not be
        # replayed there from 1000 kept parts
        rvs = []
        for m in members:
            assert wait_for(lambda m=m: _worker_of(gw, m["conf"]) is not None, 20)
            pid = _worker_of(gw, m["conf"])
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda pid=pid: not psutil.pid_exists(pid)
                            or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
            rvs.append(rv(c, "C_DigestUpdate", sess, b"x"))
            time.sleep(1.0)  # the killed member comes back (restart_delay 0.2)
        assert ckr.DEVICE_ERROR in rvs, rvs
        assert gw.alive()
    finally:
        c.close()
        gw.stop()

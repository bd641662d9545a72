"""A pool operation (``*Init`` … final) leases a member session for its whole length, and
a member has at most ``max_sessions_per_member`` sessions. One client that started
operations on a few sessions and never ended them held every session of every member:
every other client's call then waited for a lease for ever (no login needed: a
C_DigestInit is enough). Now a caller that finds no free session takes one back from an
operation that sits idle on it: a replayable one is parked and begun again (replayed) at
its next call, invisibly; one past ``replay_buffer`` is ended (CKR_DEVICE_ERROR at its
next call), and only when no replayable one is idle.

Raw frames, a real gateway over a two-member SoftHSM pool, ``max_sessions_per_member =
4`` (3 leasable sessions each), ``replay_buffer = 4096``."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from tests.adversarial.hostile import CKF_RW, CKF_SERIAL, CKM_SHA256, call, rv
from tests.gateway_proc import Gateway, RawClient
from tests.pools.members import make_member, pool_config

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr

HELD = 12  # operations left open: twice the sessions both members have
SMALL, BIG = b"abc", b"x" * 5000  # BIG: past replay_buffer, no longer replayable


def test_operations_left_open_do_not_hold_the_pool_from_other_clients(tmp_path: Path) -> None:
    members = [make_member(tmp_path, i, None) for i in range(2)]
    cfg = pool_config(tmp_path, members, max_sessions=4, extra_pool="replay_buffer = 4096")
    gw = Gateway(cfg)
    hostile = RawClient(gw.path, timeout=15)
    bystander = RawClient(gw.path, timeout=15)
    try:
        hostile.initialize()
        (slots,) = call(hostile, "C_GetSlotList", 1, 8)
        sessions = [call(hostile, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)[0]
                    for _ in range(HELD)]
        data = [BIG if i % 2 else SMALL for i in range(HELD)]
        for sess, part in zip(sessions, data, strict=True):
            # before the fix the 5th Init already waited for ever (its member was full)
            assert rv(hostile, "C_DigestInit", sess, Mechanism(CKM_SHA256, None)) == ckr.OK
            assert rv(hostile, "C_DigestUpdate", sess, part) == ckr.OK

        bystander.initialize()
        (mine,) = call(bystander, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
        for _ in range(5):
            t0 = time.monotonic()
            assert rv(bystander, "C_GenerateRandom", mine, 16) == ckr.OK
            assert time.monotonic() - t0 < 2.0
            t0 = time.monotonic()
            assert rv(bystander, "C_DigestInit", mine, Mechanism(CKM_SHA256, None)) == ckr.OK
            (d,) = call(bystander, "C_Digest", mine, b"bystander", 32)
            assert d == hashlib.sha256(b"bystander").digest()
            assert time.monotonic() - t0 < 2.0

        # the replayable operations went on where they were; the others either kept
        # their session or ended with CKR_DEVICE_ERROR, never a wrong digest
        lost = 0
        for sess, part in zip(sessions, data, strict=True):
            try:
                (d,) = call(hostile, "C_DigestFinal", sess, 32)
            except Exception as e:
                assert part is BIG and getattr(e, "rv", None) == ckr.DEVICE_ERROR, e
                lost += 1
                continue
            assert d == hashlib.sha256(part).digest()
        assert lost <= HELD // 2

        st = query(str(tmp_path / "state" / "admin.sock"))["pools"][0]["members"]
        assert all(m["state"] == "up" and m["downs"] == 0 for m in st), st
        assert all(m["sessions_open_max"] <= 4 for m in st), st
    finally:
        hostile.close()
        bystander.close()
        gw.stop()

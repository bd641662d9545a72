"""Pool metrics on /metrics agree with `status`: a member's worker hung by SIGSTOP is
marked down, its calls fail over (deadline), it is restarted and rejoins; every client
signature succeeds and is counted once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.gateway_proc import Gateway, signer, wait_for
from tests.metrics_scrape import scrape, value
from tests.pools.members import PIN, key_material, make_member, pool_config

from p11gate.admin import query
from p11gate.codec import CALLS_BY_NAME, Mechanism

ID = {n: c.id for n, c in CALLS_BY_NAME.items()}


def status(base: Path) -> dict[str, Any]:
    return query(str(base / "state" / "admin.sock"))


def test_pool_metrics_follow_a_member_failure(tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys")
    members = [make_member(tmp_path, i, keys) for i in range(2)]
    cfg = pool_config(tmp_path, members, call_timeout=1.5)
    cfg.write_text(cfg.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    gw = Gateway(cfg)
    try:
        assert gw.proc.stdout is not None
        address = gw.proc.stdout.readline().decode().split()[3]
        s0, _ = scrape(address)
        for m in ("m0", "m1"):
            assert value(s0, "p11gate_pool_member_up", pool="ha", member=m) == 1
        c, sess, key = signer(gw.path, PIN)
        pids = {b["name"]: b["pid"] for b in status(tmp_path)["backends"]}
        signed = 0

        def sign() -> None:
            nonlocal signed
            c.call(ID["C_SignInit"], [sess, Mechanism(0x1041, None), key])
            (sig,) = c.call(ID["C_Sign"], [sess, b"\x05" * 32, 64])
            assert len(sig) == 64
            signed += 1

        for _ in range(6):
            sign()
        os.kill(pids["m0"], signal.SIGSTOP)  # a hang: only the deadline tells
        timer = threading.Timer(8.0, lambda: os.kill(pids["m0"], signal.SIGCONT))
        timer.start()
        try:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                sign()
        finally:
            timer.cancel()
            try:
                os.kill(pids["m0"], signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed at its deadline and replaced
        assert wait_for(lambda: all(m["state"] == "up"
                                    for m in status(tmp_path)["pools"][0]["members"]), 20)
        for _ in range(4):
            sign()
        st = status(tmp_path)
        s1, text = scrape(address)
        pool = st["pools"][0]
        by_member = {m["backend"]: m for m in pool["members"]}
        assert by_member["m0"]["failovers"] >= 1  # the SIGSTOP was noticed by a call
        for name, m in by_member.items():
            labels = {"pool": "ha", "member": name}
            assert value(s1, "p11gate_pool_failovers_total", **labels) == m["failovers"]
            assert value(s1, "p11gate_pool_member_downs_total", **labels) == m["downs"]
            assert value(s1, "p11gate_pool_member_up", **labels) == 1
            assert value(s1, "p11gate_backend_sessions_leased", **labels) == m["sessions_leased"]
            assert value(s1, "p11gate_backend_session_waiters", **labels) == 0
        assert sum(value(s1, "p11gate_pool_replays_total", pool="ha", member=m)
                   for m in by_member) == pool["replays"]
        assert value(s1, "p11gate_pool_member_downs_total", pool="ha", member="m0") >= 1
        assert value(s1, "p11gate_backend_restarts_total", backend="m0") >= 1
        ok = {"token": "ha-token", "result": "CKR_OK"}
        assert value(s1, "p11gate_calls_total", call="C_Sign", **ok) == signed
        assert value(s1, "p11gate_calls_total", call="C_SignInit", **ok) == signed
        assert 'result="CKR_DEVICE_ERROR"' not in text  # the client never saw the failure
        print({"signed": signed, "failovers_m0": by_member["m0"]["failovers"],
               "downs_m0": by_member["m0"]["downs"]})
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
    assert alive, gw.log()[-3000:]

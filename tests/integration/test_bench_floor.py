"""The Python floor (bench/floor.py, the bench's opt-in `floor` and `floor-echo` targets):
it serves every call the load generator makes through the real p11-kit-client.so for all
five ops, its server CPU per op is measured and set against p11-kit server's, and the
echo variant really answers C_GenerateRandom without the module."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p11gate.bench.rpc_client import AsyncRpcClient
from p11gate.codec import ReplyError, ckr

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(SOFTHSM) and shutil.which("p11-kit") and shutil.which("cc")),
    reason="needs SoftHSMv2, p11-kit and a C compiler",
)
OPS = ("random", "ecsign", "rsasign", "attrs", "find")
C_GET_SLOT_LIST, C_GENERATE_RANDOM = 4, 64


@pytest.mark.timeout(60)
def test_bench_floor_targets_serve_all_ops_and_measure_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "bench", "--ops", ",".join(OPS),
         "--targets", "p11kit,floor,floor-echo", "--threads", "1", "--seconds", "0.4",
         "--warmup", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=58,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "FAILED" not in r.stdout, r.stdout

    data = json.loads(out.read_text())
    by = {(x["target"], x["op"]): x for x in data["results"]}
    assert set(by) == {(t, op) for t in ("p11kit", "floor", "floor-echo") for op in OPS}
    for target in ("floor", "floor-echo"):
        for op in OPS:
            x = by[(target, op)]
            # every call of the set-up (handshake, slots, token info, sessions, login,
            # find) and of the op went through and succeeded
            assert x["errors"] == 0 and x["completed"] > 10, x
            assert "floor server" in x["cpu_of"], x
            cpu = x["cpu_per_op_us"]
            assert isinstance(cpu, float) and math.isfinite(cpu) and cpu > 0, x
            assert 0.2 <= x["cpu_window_s"] <= 1.5, x  # sampled over the window only
            assert math.isfinite(x["cpu_ratio"]) and x["cpu_ratio"] > 0, x  # vs p11-kit
    for op in OPS:
        echo, floor = by[("floor-echo", op)], by[("floor", op)]
        assert echo["floor_ratio"] == echo["cpu_per_op_us"] / floor["cpu_per_op_us"]
        assert floor["floor_ratio"] is None
        assert data["cpu_per_op_us"][f"floor/{op}/1x1"]["ratio_vs_p11kit"] == floor["cpu_ratio"]
    # a yardstick, not a p11gate target: no verdicts of its own
    assert not any(c["target"].startswith("floor") for c in data["checks"])
    # the floor section: one row per op with both floors' CPU, and the reading against
    # issue 11's limits
    section = r.stdout.split("the Python floor (", 1)[1]
    for op in OPS:
        assert re.search(rf"^{op}\s+1\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+\s", section, re.M), section
    assert re.search(r"floor vs issue 11's CPU limits.*random/1x1 [\d.]+× \(none ≤ 1\.5×: "
                     r"(within|ABOVE), process ≤ 2\.0×: (within|ABOVE)\)", section), section

    from p11gate.bench.cli import EXTRA_TARGETS, TARGETS
    assert {"floor", "floor-echo"} <= set(EXTRA_TARGETS) and "floor" not in TARGETS


def _start_floor(tmp_path: Path, name: str, echo: bool) -> tuple[subprocess.Popen[str], str]:
    (tmp_path / "tokens").mkdir(exist_ok=True)
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    sock = tmp_path / f"{name}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p11gate.bench.floor", "--module", SOFTHSM, "--socket",
         str(sock), *(["--echo"] if echo else [])],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == f"P11_KIT_SERVER_ADDRESS=unix:path={sock}; export P11_KIT_SERVER_ADDRESS;\n"
    return proc, str(sock)


@pytest.mark.timeout(30)
def test_floor_echo_answers_random_without_the_module(tmp_path: Path) -> None:
    """On a session the module never opened, the floor relays SoftHSM's refusal while the
    echo floor answers from os.urandom: the echo measures asyncio and the codec alone."""

    async def random_on_bogus_session(path: str) -> list[object] | int:
        c = await AsyncRpcClient.connect(path)  # version byte + C_Initialize handshake
        try:
            slots = await c.call(C_GET_SLOT_LIST, [0, 16])  # other calls: the module's
            assert isinstance(slots[0], list) and slots[0], slots
            try:
                return await c.call(C_GENERATE_RANDOM, [0xDEAD, 32])
            except ReplyError as e:
                return e.rv
        finally:
            await c.close()

    for echo in (False, True):
        proc, path = _start_floor(tmp_path, f"floor-{echo}", echo)
        try:
            got = asyncio.run(asyncio.wait_for(random_on_bogus_session(path), 20))
        finally:
            proc.terminate()
            assert proc.wait(10) == 0  # SIGTERM: a clean stop, module finalized
        if echo:
            assert isinstance(got, list) and isinstance(got[0], bytes) and len(got[0]) == 32
        else:
            assert got == ckr.SESSION_HANDLE_INVALID, got

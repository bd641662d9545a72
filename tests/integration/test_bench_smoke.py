"""`p11gate bench --quick`: against SoftHSM directly and through p11-kit server it runs,
reports every cell with sane numbers and no failed calls, and writes its JSON; against
p11-kit server, p11gate (process isolation) and a pool of two tokens it reports the
server-side CPU time per operation of every target, and the ratios and verdicts built on
it."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path


def test_bench_quick_direct_and_p11kit(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "bench", "--quick", "--ops", "random",
         "--targets", "direct,p11kit", "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "FAILED" not in r.stdout, r.stdout

    # the printed table: 1 thread, 8 threads on one connection, 8 connections, per target
    rows = re.findall(r"^(direct|p11kit)\s+random\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+"
                      r"([\d.]+)\s+(\d+)\s+([\d.]+)\*?\s+([\d.]+)", r.stdout, re.M)
    assert {(t, int(n), int(c)) for t, n, c, *_ in rows} == {
        (t, n, c) for t in ("direct", "p11kit") for n, c in ((1, 1), (8, 1), (8, 8))}
    for _target, _n, _c, ops, p50, p99, errors, cpu, cli in rows:
        assert int(ops) > 0 and 0 < float(p50) <= float(p99) and int(errors) == 0
        assert float(cpu) > 0 and float(cli) > 0

    data = json.loads(out.read_text())
    by = {(x["target"], x["threads"], x["connections"]): x for x in data["results"]}
    assert len(by) == 6
    for x in by.values():
        assert x["errors"] == 0, x
        assert x["ops_per_s"] > 100, x
        assert x["calls"] > 100, x
        assert 0 < x["p50_us"] <= x["p99_us"] <= x["max_us"], x
    # the numbers mean something: loading the module directly beats any RPC path
    assert by[("direct", 1, 1)]["p50_us"] < by[("p11kit", 1, 1)]["p50_us"]
    assert by[("direct", 1, 1)]["ops_per_s"] > by[("p11kit", 1, 1)]["ops_per_s"]
    # direct's CPU is the load generator's own, and says so
    assert "load generator" in by[("direct", 1, 1)]["cpu_of"]
    assert "p11-kit server" in by[("p11kit", 1, 1)]["cpu_of"]


def test_bench_quick_cpu_per_op_p11kit_process_pool(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "bench", "--quick", "--ops", "random",
         "--targets", "p11kit,process,pool", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "FAILED" not in r.stdout, r.stdout

    data = json.loads(out.read_text())
    by = {x["target"]: x for x in data["results"]}
    assert sorted(by) == ["p11kit", "pool", "process"], data["results"]  # the pool ran
    for x in by.values():
        assert x["errors"] == 0 and x["completed"] > 100, x
        for key in ("cpu_per_op_us", "client_cpu_per_op_us"):
            v = x[key]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, x)
        # the CPU samples bracket the measured window (1 s), not the warm-up
        assert 0.5 <= x["cpu_window_s"] <= 2.0, x
        assert data["cpu_per_op_us"][f"{x['target']}/random/1x1"]["cpu_per_op_us"] == \
            x["cpu_per_op_us"]
    # ratios: the gateway's and the pool's to p11-kit server's, the pool's to process's
    for target in ("process", "pool"):
        assert math.isfinite(by[target]["cpu_ratio"]) and by[target]["cpu_ratio"] > 0
    assert by["pool"]["pool_cpu_ratio"] == by["pool"]["cpu_per_op_us"] / \
        by["process"]["cpu_per_op_us"]
    assert by["p11kit"]["cpu_ratio"] is None
    # a verdict per criterion, with the numbers (no added latency: that needs direct)
    crits = {(c["target"], c["criterion"]) for c in data["checks"]}
    assert {("process", "cpu"), ("pool", "pool-cpu")} <= crits
    for target, what in (("process", "server CPU per op vs p11-kit server"),
                         ("pool", "pool server CPU per op vs plain token")):
        assert re.search(rf"^(PASS|FAIL) {target}\s+{what}\s+[\d.]+×", r.stdout, re.M), r.stdout


def test_bench_remote_target_serves_through_p11kit_remote(tmp_path: Path) -> None:
    """The opt-in `remote` target (process isolation, `p11-kit remote` as the worker) is
    measured like the others and ratioed to p11-kit server, but is not a default target
    and gets no verdict (it is a comparison, not a supported configuration)."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "bench", "--quick", "--ops", "random",
         "--targets", "p11kit,remote", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "FAILED" not in r.stdout, r.stdout
    data = json.loads(out.read_text())
    by = {x["target"]: x for x in data["results"]}
    remote = by["remote"]
    assert remote["errors"] == 0 and remote["completed"] > 100, remote
    assert "p11-kit remote" in remote["cpu_of"]
    assert remote["cpu_per_op_us"] > 0 and math.isfinite(remote["cpu_ratio"])
    assert not any(c["target"] == "remote" for c in data["checks"])
    from p11gate.bench.cli import TARGETS
    assert "remote" not in TARGETS

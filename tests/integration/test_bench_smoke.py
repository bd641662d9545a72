"""`p11gate bench --quick` against SoftHSM directly and through p11-kit server: it runs,
reports every cell with sane numbers and no failed calls, and writes its JSON."""

from __future__ import annotations

import json
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
                      r"([\d.]+)\s+(\d+)\s*$", r.stdout, re.M)
    assert {(t, int(n), int(c)) for t, n, c, *_ in rows} == {
        (t, n, c) for t in ("direct", "p11kit") for n, c in ((1, 1), (8, 1), (8, 8))}
    for _target, _n, _c, ops, p50, p99, errors in rows:
        assert int(ops) > 0 and 0 < float(p50) <= float(p99) and int(errors) == 0

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

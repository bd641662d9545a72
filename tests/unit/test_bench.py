"""`p11gate bench` runs end to end and reports sane numbers for every target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "p11gate.cli", "bench", "--quick", "--ops", "random,ecsign",
         "--threads", "1,2", "--targets", "direct,p11kit,process,none", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(x["target"], x["op"], x["threads"]) for x in rows} == {
        (t, o, n) for t in ("direct", "p11kit", "process", "none")
        for o in ("random", "ecsign") for n in (1, 2)
    }
    for x in rows:
        assert x["errors"] == 0, x
        assert x["ops_per_s"] > 10, x
        assert 0 < x["p50_us"] <= x["p99_us"], x
    # the direct module is faster than any RPC path: the numbers mean something
    by = {(x["target"], x["op"], x["threads"]): x for x in rows}
    assert by[("direct", "random", 1)]["p50_us"] < by[("p11kit", "random", 1)]["p50_us"]
    assert any("added latency" in c["what"] for c in data["checks"])
    assert "PASS" in r.stdout or "MISS" in r.stdout

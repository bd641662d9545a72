"""Measuring one bench cell: the native load generator (loadgen.c) is run against a
target, and the CPU time of the serving processes and of the load generator is sampled
over its measured window only; repeated runs are folded into their median, and the
shared p11bench can run the same cell as a yardstick.

Why a module of its own: this is where the figures come from; how they are judged
(verdicts.py) and shown (report.py) is kept apart from how they are taken."""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from pathlib import Path

from .cpu import Sample, sample, used
from .results import Result, Unavailable
from .targets import LABEL, PIN, Target

# whose CPU time is the row's cpu_per_op_us
CPU_OF = {"direct": "load generator (module in-process: reference)",
          "p11kit": "p11-kit server and its children",
          "process": "gateway and its worker", "none": "gateway",
          "pool": "gateway and its two workers", "soft": "gateway",
          "remote": "gateway and p11-kit remote", "floor": "floor server",
          "floor-echo": "floor server (echo)"}



def parse_line(line: str) -> dict[str, str]:
    """`k=v k=v ...` -> dict; raises ValueError on anything else."""
    fields = dict(kv.split("=", 1) for kv in line.split())
    for key in ("ops_per_s", "p50_us", "p99_us", "errors"):
        if key not in fields:
            raise ValueError(f"no {key} in {line!r}")
    return fields


def _cpu_per_op(before: Sample, after: Sample, pid: int, done: int) -> float | None:
    cpu = used(before, after, pid)
    return None if cpu is None or done <= 0 else cpu / done * 1e6


def measure(exe: Path, t: Target, op: str, threads: int, connections: int, seconds: float,
            warmup: float) -> Result:
    """One cell. The load generator marks its measured window on stdout; the CPU time of
    the server's process tree and of the load generator's is sampled right at both
    marks, so warm-up and set-up are not counted."""
    per_proc = threads // connections
    cmd = [str(exe), "-p", str(connections), "-t", str(per_proc), "-d", str(seconds),
           "-w", str(warmup), "-P", PIN, "-l", LABEL, "-H", t.module, op]
    limit = time.monotonic() + seconds + warmup + 120
    samples: dict[str, tuple[float, Sample]] = {}
    lines: list[str] = []
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=t.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None and proc.stdin is not None
        roots = [proc.pid] + ([t.proc.pid] if t.proc is not None else [])
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            buf = b""
            while True:
                left = limit - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"{t.name} {op}: load generator timed out")
                if not sel.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode(errors="replace").strip()
                    if line.startswith("window="):
                        samples[line[7:]] = (time.monotonic(), sample(roots))
                        if line == "window=end":  # sampled: the load may finish (-H)
                            proc.stdin.close()
                    elif line:
                        lines.append(line)
            proc.wait(max(1.0, limit - time.monotonic()))
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            sel.close()
            proc.stdout.close()
            if not proc.stdin.closed:
                proc.stdin.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise Unavailable(f"{t.name} {op} ({threads} threads, {connections} connection(s)): "
                          f"{stderr or f'exit status {proc.returncode}'}")
    try:
        f = parse_line(lines[-1])
    except (IndexError, ValueError) as e:
        raise Unavailable(f"{t.name} {op}: unparseable output {lines!r}") from e
    r = Result(t.name, op, threads, connections, float(f["ops_per_s"]), float(f["p50_us"]),
               float(f["p99_us"]), float(f.get("mean_us", 0)), float(f.get("max_us", 0)),
               int(f.get("calls", 0)), int(f["errors"]), f.get("first_error", "0x0"))
    r.completed = int(f.get("completed", round(r.ops_per_s * seconds)))
    r.cpu_of = CPU_OF[t.name]
    if "start" in samples and "end" in samples:
        (t0, before), (t1, after) = samples["start"], samples["end"]
        r.cpu_window_s = round(t1 - t0, 4)
        server = t.proc.pid if t.proc is not None else proc.pid
        r.cpu_per_op_us = _cpu_per_op(before, after, server, r.completed)
        r.client_cpu_per_op_us = _cpu_per_op(before, after, proc.pid, r.completed)
    return r


def median_of(runs: list[Result]) -> Result:
    """One row for repeated runs of a cell: the median of each measure, summed counts."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float]) -> float:
        v = sorted(values)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    def med_opt(values: list[float | None]) -> float | None:
        v = [x for x in values if x is not None]
        return med(v) if v else None

    first = runs[0]
    errs = [r.first_error for r in runs if r.errors]
    out = Result(first.target, first.op, first.threads, first.connections,
                 med([r.ops_per_s for r in runs]), med([r.p50_us for r in runs]),
                 med([r.p99_us for r in runs]), med([r.mean_us for r in runs]),
                 max(r.max_us for r in runs), sum(r.calls for r in runs),
                 sum(r.errors for r in runs), errs[0] if errs else "0x0")
    out.cpu_per_op_us = med_opt([r.cpu_per_op_us for r in runs])
    out.client_cpu_per_op_us = med_opt([r.client_cpu_per_op_us for r in runs])
    out.cpu_of = first.cpu_of
    out.completed = sum(r.completed for r in runs)
    out.cpu_window_s = med([r.cpu_window_s for r in runs])
    return out



def yardstick(exe: Path, t: Target, op: str, threads: int, seconds: float) -> Result:
    """The shared neutral p11bench, same op, all threads on one connection."""
    key_id = "02" if op == "rsasign" else "01"
    r = subprocess.run([str(exe), t.module, op, str(threads), str(seconds), PIN, key_id, LABEL],
                       env=t.env, capture_output=True, text=True, timeout=seconds + 120)
    try:
        f = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return Result(t.name, op, threads, 1, float(f["ops_per_s"]), float(f["p50_us"]),
                      float(f["p99_us"]), 0.0, 0.0, 0, int(f["errors"]), "", tool="p11bench")
    except (KeyError, ValueError) as e:
        raise Unavailable(f"p11bench {t.name} {op}: {r.stderr.strip() or r.stdout!r}") from e


def shapes(thread_counts: list[int], connections: list[str]) -> list[tuple[int, int]]:
    """(threads, connections) cells: 1 thread is one cell; N > 1 threads is measured as N
    threads on one connection ("shared") and/or N processes with one connection each
    ("separate")."""
    out: list[tuple[int, int]] = []
    for n in thread_counts:
        cells = [(1, 1)] if n == 1 else [(n, 1) if c == "shared" else (n, n)
                                         for c in connections]
        out.extend(c for c in cells if c not in out)
    return out

"""`p11gate bench`: in one run, the same PKCS#11 operations against SoftHSMv2 loaded
directly, through `p11-kit server`, and through p11gate (process isolation, in-process,
and a pool of two tokens), driven by a native load generator (loadgen.c, compiled on
first use). Reports per cell throughput, latency and the server-side CPU time per
operation (sampled from /proc over the measured window only), the ratios of p11gate to
p11-kit server (and of the pool to the plain token), and PASS/FAIL against the targets.
See docs/benchmarks.md.

The command and its options are here; the parts are in their own modules: targets.py
(the token and the servers), measuring.py (one cell), verdicts.py (ratios and checks),
report.py (the text output), machine.py (the run's context), results.py (the records)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import click
from click.core import ParameterSource

from .floor_report import FLOOR_TARGETS
from .machine import BUSY, cpu_busy, load_average, machine, versions
from .measuring import measure, median_of, shapes, yardstick
from .report import report, row
from .results import Run, Unavailable
from .targets import make_token, running
from .verdicts import analyse, summary

OPS = ("random", "ecsign", "rsasign", "attrs", "find")
QUICK_OPS = ("random", "ecsign")  # --quick: RPC overhead alone, and a signature
TARGETS = ("direct", "p11kit", "process", "none", "pool", "soft")
# opt-in (--targets): process isolation with stock `p11-kit remote` as the worker, to
# weigh it against `p11gate worker` (it has no deadlines of its own and no native
# parameter checks, so it is not the default worker; see docs/benchmarks.md); and the
# Python floor (bench/floor.py): the least server p11gate's codec allows, module called
# in-line, and the same answering C_GenerateRandom without the module (floor-echo)
EXTRA_TARGETS = ("remote", *FLOOR_TARGETS)
CONNECTIONS = ("shared", "separate")

DESCRIPTIONS = {
    "direct": "SoftHSMv2 loaded into the load generator",
    "p11kit": "p11-kit server --provider libsofthsm2.so, via p11-kit-client.so",
    "process": 'p11gate, isolation = "process" (module in a worker process)',
    "none": 'p11gate, isolation = "none" (module in the gateway, thread pool)',
    "pool": 'p11gate, a pool of two SoftHSM tokens (members isolation = "process")',
    "soft": "p11gate, the built-in soft token (SQLite file, crypto by `cryptography`)",
    "remote": 'p11gate, isolation = "process", worker_command = p11-kit remote',
    "floor": "least Python server on p11gate's codec, module in-line on the loop (floor)",
    "floor-echo": "the floor, C_GenerateRandom from os.urandom (asyncio + codec only)",
}


# ---------------------------------------------------------------------------- building


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p11gate"


def compile_c(src: bytes, stem: str) -> Path:
    """Compile a single C file (cached by content hash) and return the executable. Built
    as the native executor is (backends/native/build.py): a private cache, a cached
    binary run only when nobody else could have written it, a compiler that sees only
    PATH and TMPDIR."""
    # imported here: the native package loads cffi, which every p11gate command would
    # otherwise pay for at start (this module is imported to register `bench`)
    from ..backends.native.build import BuildError, CompileFailed, NoCompiler, build

    try:
        return build(src, cache_dir(), f"{stem}-{hashlib.sha256(src).hexdigest()[:12]}", stem,
                     ["-O2", "-pthread", "-I/usr/include/p11-kit-1"], ["-ldl"])
    except NoCompiler:
        raise click.ClickException(
            "a C compiler is needed: apt-get install gcc libp11-kit-dev") from None
    except CompileFailed as e:
        hint = ""
        if "pkcs11.h" in e.stderr:
            hint = "\n(the PKCS#11 header is missing: apt-get install libp11-kit-dev)"
        raise click.ClickException(f"compiling {stem} failed:\n{e.stderr}{hint}") from None
    except BuildError as e:  # a cache another user could write to
        raise click.ClickException(str(e)) from None


def loadgen_binary() -> Path:
    return compile_c(resources.files("p11gate.bench").joinpath("loadgen.c").read_bytes(),
                     "loadgen")


# ---------------------------------------------------------------------------- command


def split_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise click.BadParameter(f"unknown {what}: {', '.join(bad) or '(none)'}; "
                                 f"choose from {', '.join(allowed)}")
    return items


@click.command()
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="measured duration of each cell")
@click.option("--warmup", type=float, default=0.3, show_default=True,
              help="unmeasured calls before each cell's measurement")
@click.option("--quick", is_flag=True,
              help=f"1 s cells, 0.1 s warm-up, ops {','.join(QUICK_OPS)} (unless given "
                   "explicitly)")
@click.option("--ops", default=",".join(OPS), show_default=True,
              help="operations, comma separated")
@click.option("--targets", default=",".join(TARGETS), show_default=True,
              help="targets, comma separated")
@click.option("--threads", "threads_opt", default="1,8", show_default=True,
              help="client thread counts, comma separated")
@click.option("--connections", "connections_opt", default="shared,separate",
              show_default=True,
              help="for N > 1 threads: 'shared' = N threads in one process on one "
                   "connection; 'separate' = N processes, one connection each")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="run each cell this many times and report the median of each measure")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="write all results to this file")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="[server] processes of the p11gate targets (gateway processes)")
@click.option("--yardstick", "yardstick_src", type=click.Path(exists=True, dir_okay=False),
              default=None, help="also run the cells through this p11bench.c (shared-"
                                 "connection cells only), as a check on the load generator")
def bench(seconds: float, warmup: float, quick: bool, ops: str, targets: str, threads_opt: str,
          connections_opt: str, repeat: int, json_path: str | None, processes: int,
          yardstick_src: str | None) -> None:
    """Benchmark SoftHSMv2 directly, through p11-kit server and through p11gate.

    Creates a throw-away SoftHSM token, then measures each operation with 1 and N client
    threads against each target, and prints a table, the ratios of p11gate to p11-kit
    server, and PASS/FAIL against the targets: server-side CPU per op and added latency
    ≤ 1.5× p11-kit server's in-process, ≤ 2× isolated; 8 threads on one connection
    ≥ 1.5× p11-kit server's throughput (N connections ≥ 1×); a pool of two ≤ 1.2× the
    plain token's CPU per op.
    """
    if quick:  # shorter and fewer cells, but what is given explicitly wins
        ctx = click.get_current_context()

        def default(name: str) -> bool:
            return ctx.get_parameter_source(name) is ParameterSource.DEFAULT

        if default("seconds"):
            seconds = 1.0
        if default("warmup"):
            warmup = 0.1
        if default("ops"):
            ops = ",".join(QUICK_OPS)
    if seconds <= 0 or warmup < 0:
        raise click.BadParameter("--seconds must be > 0 and --warmup ≥ 0")
    op_list = split_list(ops, OPS, "op")
    target_list = split_list(targets, (*TARGETS, *EXTRA_TARGETS), "target")
    conn_list = split_list(connections_opt, CONNECTIONS, "connections mode")
    try:
        thread_list = [int(x) for x in threads_opt.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"--threads: {e}") from e
    if not thread_list or any(not 1 <= n <= 256 for n in thread_list):
        raise click.BadParameter("--threads: numbers from 1 to 256")
    cells = shapes(thread_list, conn_list)

    exe = loadgen_binary()
    p11bench = None
    if yardstick_src:
        p11bench = compile_c(Path(yardstick_src).read_bytes(), "p11bench")
    run = Run()
    started = time.time()
    load_before = load_average()
    busy_before = cpu_busy()
    cpus = os.cpu_count() or 1
    busy = busy_before is not None and busy_before > BUSY
    if busy:
        click.echo(f"WARNING: this machine is busy ({busy_before:.0%} of {cpus} CPUs in use "
                   "before the run): the numbers will be noisy", err=True)
    total = len(target_list) * len(op_list) * len(cells)
    done = 0
    with tempfile.TemporaryDirectory(prefix="p11gate-bench-") as tmp:
        base = Path(tmp)
        env = make_token(base)
        for name in target_list:
            try:
                with running(name, base, env, processes) as t:
                    click.echo(f"# {name}: {DESCRIPTIONS[name]}", err=True)
                    for op in op_list:
                        for threads, conns in cells:
                            done += 1
                            if not t.alive():
                                raise Unavailable(f"{name} stopped during the run:\n"
                                                  f"{t.log_tail()}")
                            try:
                                r = median_of([measure(exe, t, op, threads, conns, seconds,
                                                       warmup) for _ in range(repeat)])
                            except Unavailable as e:
                                if not t.alive():
                                    raise
                                run.failed_cells.append(str(e))
                                click.echo(f"FAILED {e}", err=True)
                                continue
                            run.results.append(r)
                            click.echo(f"[{done}/{total}] " + row(r), err=True)
                            if p11bench is not None and conns == 1:
                                try:
                                    run.yardstick.append(
                                        yardstick(p11bench, t, op, threads, seconds))
                                except Unavailable as e:
                                    click.echo(f"yardstick: {e}", err=True)
            except Unavailable as e:
                run.skipped[name] = str(e)
                click.echo(f"SKIPPING {name}: {e}", err=True)
    checks = analyse(run.results)
    vers = versions()
    context = (f"{time.strftime('%Y-%m-%d')}, {machine()}, "
               + ", ".join(f"{k} {v}" for k, v in vers.items())
               + f"; {seconds:g} s cells after {warmup:g} s warm-up"
               + (f", median of {repeat}" if repeat > 1 else ""))
    report(run, checks, context)
    if busy:
        click.echo(f"\nWARNING: the machine was busy when the run started ({busy_before:.0%} "
                   f"of {cpus} CPUs in use): the numbers are noisy")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(), "cpus": os.cpu_count(), "versions": vers,
            "seconds": seconds, "warmup": warmup, "repeat": repeat,
            "load_average_before": load_before, "cpu_busy_before": busy_before,
            "duration_s": round(time.time() - started, 1),
            "results": [asdict(r) for r in run.results],
            "yardstick": [asdict(r) for r in run.yardstick],
            "checks": [asdict(c) for c in checks],
            "summary": [{"target": s[0], "criterion": s[1], "worst": s[2], "worst_op": s[3],
                         "limit": s[4], "met": s[5]} for s in summary(checks)],
            "cpu_per_op_us": {f"{r.target}/{r.op}/{r.threads}x{r.connections}": {
                "cpu_per_op_us": r.cpu_per_op_us, "cpu_of": r.cpu_of,
                "client_cpu_per_op_us": r.client_cpu_per_op_us,
                "ratio_vs_p11kit": r.cpu_ratio, "ratio_vs_process": r.pool_cpu_ratio,
                "ratio_vs_floor": r.floor_ratio,
                "p50_us": r.p50_us, "ops_per_s": r.ops_per_s} for r in run.results},
            "skipped": run.skipped, "failed_cells": run.failed_cells,
        }, indent=1) + "\n")
    if not run.results:
        raise click.ClickException("nothing was measured")

"""The bench's text output: the table of results (one row per cell, also printed as each
cell is measured), the yardstick's table, the floor's lines, what was skipped or failed,
and PASS/FAIL per target and criterion.

Why a module of its own: the output format is what users and docs/benchmarks.md read;
kept together, a change to a column is a change to one module."""

from __future__ import annotations

import click

from .floor_report import floor_report
from .results import Check, Result, Run
from .verdicts import AT_MOST, CPU_LIMIT, CRITERIA, summary


def fmt_ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


HEADER = (f"{'target':8} {'op':8} {'thr':>3} {'conn':>4} {'ops/s':>10} {'p50 µs':>9} "
          f"{'p99 µs':>9} {'errors':>6} {'cpu µs':>8} {'cli µs':>7} {'cpu×':>6} {'+lat×':>7} "
          f"{'thr×':>6} {'pool×':>6}")


def fmt_us(v: float | None, mark: str = "") -> str:
    return "n/a" if v is None else f"{v:.1f}{mark}"


def row(r: Result) -> str:
    lat = fmt_ratio(r.added_latency_ratio)
    thr = fmt_ratio(r.throughput_ratio) if r.threads > 1 else ""
    cpu = fmt_us(r.cpu_per_op_us, "*" if r.target == "direct" else "")
    return (f"{r.target:8} {r.op:8} {r.threads:3} {r.connections:4} {r.ops_per_s:10.0f} "
            f"{r.p50_us:9.1f} {r.p99_us:9.1f} {r.errors:6} {cpu:>8} "
            f"{fmt_us(r.client_cpu_per_op_us):>7} {fmt_ratio(r.cpu_ratio):>6} {lat:>7} "
            f"{thr:>6} {fmt_ratio(r.pool_cpu_ratio):>6}").rstrip()


CPU_NOTE = ("cpu µs: user+system CPU of the serving processes (gateway and workers; p11-kit "
            "server and children) over the measured window, per op completed in it; "
            "* direct: the load generator's own CPU (the module runs in it), as the "
            "reference. cli µs: the load generator's CPU per op. cpu×: cpu µs / p11-kit "
            "server's, same cell. pool×: pool cpu µs / process target's, same cell.")



def report(run: Run, checks: list[Check], context: str) -> None:
    click.echo(f"# {context}")
    click.echo(HEADER)
    for r in run.results:
        click.echo(row(r))
    click.echo(CPU_NOTE)
    if run.yardstick:
        click.echo("\nyardstick: p11bench (shared tool), same cells, all threads on 1 connection")
        click.echo(f"{'target':8} {'op':8} {'thr':>3} {'ops/s':>10} {'p50 µs':>9} {'p99 µs':>9} "
                   f"{'errors':>6}  loadgen ops/s")
        mine = {(r.target, r.op, r.threads, r.connections): r for r in run.results}
        for y in run.yardstick:
            m = mine.get((y.target, y.op, y.threads, 1))
            click.echo(f"{y.target:8} {y.op:8} {y.threads:3} {y.ops_per_s:10.0f} "
                       f"{y.p50_us:9.1f} {y.p99_us:9.1f} {y.errors:6}  "
                       f"{m.ops_per_s if m else float('nan'):.0f}")
    for line in floor_report(run.results, CPU_LIMIT):
        click.echo(line)
    for name, why in run.skipped.items():
        click.echo(f"\nSKIPPED {name}: {why}")
    for cell in run.failed_cells:
        click.echo(f"FAILED {cell}")
    rows = summary(checks)
    if rows:
        click.echo("\ntargets (p11gate vs p11-kit server, pool vs plain token; worst cell "
                   "shown):")
        at_most = {CRITERIA[c] for c in AT_MOST}
        for target, crit, worst, op, limit, met, detail in rows:
            sign = "≤" if crit in at_most else "≥"
            click.echo(f"{'PASS' if met else 'FAIL'} {target:8} {crit:40} {worst:6.2f}× "
                       f"({op}; target {sign} {limit}×)  [{detail}]")
    errors = sum(r.errors for r in run.results)
    if errors:
        click.echo(f"\nWARNING: {errors} calls failed; see first_error in the JSON output")

"""The bench's view of the Python floor (bench/floor.py): per cell, the floor's server CPU
per op next to p11-kit server's and the gateway's, and the ratios that say how much of
the gap to issue 11's targets any Python server must keep (floor / p11-kit) and how much
is p11gate's own (gateway / floor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Result

FLOOR_TARGETS = ("floor", "floor-echo")
_COLUMNS = ("p11kit", "floor", "floor-echo", "none", "process")


def _cells(results: Sequence[Result]) -> dict[tuple[str, int, int], dict[str, Result]]:
    out: dict[tuple[str, int, int], dict[str, Result]] = {}
    for r in results:
        out.setdefault((r.op, r.threads, r.connections), {})[r.target] = r
    return out


def floor_ratios(results: Sequence[Result]) -> None:
    """Set ``floor_ratio`` (CPU per op / the floor's, same cell) on every other row."""
    for rows in _cells(results).values():
        floor = rows.get("floor")
        if floor is None or not floor.cpu_per_op_us:
            continue
        for target, r in rows.items():
            if target != "floor" and r.cpu_per_op_us is not None:
                r.floor_ratio = r.cpu_per_op_us / floor.cpu_per_op_us


def _ratio(a: Result | None, b: Result | None) -> str:
    if a is None or b is None or a.cpu_per_op_us is None or not b.cpu_per_op_us:
        return "—"
    return f"{a.cpu_per_op_us / b.cpu_per_op_us:.2f}×"


def _us(r: Result | None) -> str:
    return "—" if r is None or r.cpu_per_op_us is None else f"{r.cpu_per_op_us:.1f}"


def floor_report(results: Sequence[Result], limits: Mapping[str, float]) -> list[str]:
    """Lines for the bench's output; none when no floor target ran."""
    cells = {k: v for k, v in _cells(results).items() if any(t in v for t in FLOOR_TARGETS)}
    if not cells:
        return []
    lines = ["", "the Python floor (server CPU µs per op, same cells; floor = bench/floor.py, "
             "the least asyncio server on p11gate's codec, module in-line):",
             f"{'op':8} {'thr':>3} {'conn':>4} " + " ".join(f"{c:>10}" for c in _COLUMNS)
             + f" {'floor/p11kit':>12} {'echo/p11kit':>11} {'none/floor':>10} "
               f"{'process/floor':>13}"]
    verdicts = []
    for (op, threads, conns), rows in cells.items():
        k, f = rows.get("p11kit"), rows.get("floor")
        lines.append(f"{op:8} {threads:3} {conns:4} "
                     + " ".join(f"{_us(rows.get(c)):>10}" for c in _COLUMNS)
                     + f" {_ratio(f, k):>12} {_ratio(rows.get('floor-echo'), k):>11} "
                       f"{_ratio(rows.get('none'), f):>10} {_ratio(rows.get('process'), f):>13}")
        if f is not None and k is not None and f.cpu_per_op_us and k.cpu_per_op_us:
            v = f.cpu_per_op_us / k.cpu_per_op_us
            verdicts.append(f"{op}/{threads}x{conns} {v:.2f}× ("
                            + ", ".join(f"{t} ≤ {lim}×: {'within' if v <= lim else 'ABOVE'}"
                                        for t, lim in limits.items()) + ")")
    if verdicts:
        lines.append("floor vs issue 11's CPU limits (a limit the floor is above cannot be met "
                     "by any Python server on this codec and loop): " + "; ".join(verdicts))
    return lines

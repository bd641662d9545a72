"""CPU time of whole process trees, from /proc (Linux only).

A sample is, for every process in the trees, its own CPU time (utime + stime of all its
threads) keyed by (pid, start time), so a reused pid is not mistaken for the old
process. The CPU used between two samples is the sum over the processes of the second
sample of what each used since the first (all of it, for a process new since then).
A process present in the first sample and gone by the second contributes nothing, so a
process that was exiting when the window opened (e.g. p11-kit server's child for the
previous connection) is not charged, and cutime/cstime (waited-for children's whole
lives, before the window too) are not used; the price is that a process that starts
and exits inside the window is missed. The resolution is one clock tick (usually 10 ms)
per process."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TICK = 1.0 / os.sysconf("SC_CLK_TCK")

Sample = dict[int, dict[tuple[int, int], float]]  # root -> {(pid, start): CPU seconds}


def _scan() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, start time in ticks, own CPU seconds) for every process."""
    out: dict[int, tuple[int, int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        f = raw[raw.rfind(b")") + 2:].split()
        try:
            out[int(entry.name)] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) * TICK)
        except (IndexError, ValueError):
            continue
    return out


def sample(roots: Iterable[int]) -> Sample:
    """The CPU seconds used so far by every process in each root's tree."""
    procs = _scan()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    result: Sample = {}
    for root in roots:
        tree: dict[tuple[int, int], float] = {}
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid not in procs or any(k[0] == pid for k in tree):
                continue
            _, start, cpu = procs[pid]
            tree[(pid, start)] = cpu
            todo.extend(children.get(pid, ()))
        result[root] = tree
    return result


def used(before: Sample, after: Sample, root: int) -> float | None:
    """CPU seconds used by root's tree between the two samples; None if root is absent."""
    if root not in before or root not in after or not after[root]:
        return None
    b = before[root]
    return sum(cpu - b.get(key, 0.0) for key, cpu in after[root].items())

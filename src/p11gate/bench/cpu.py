"""CPU time of whole process trees, from /proc (Linux only).

A tree's CPU time is utime + stime of every process in it (all threads), plus cutime +
cstime (the time of children that have exited and been waited for), so a child that
exits between two samples is still counted. Differences of two samples are what matter;
the resolution is one clock tick (usually 10 ms) per process."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def _scan() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds incl. waited-for children) for every process."""
    out: dict[int, tuple[int, float]] = {}
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
            out[int(entry.name)] = (int(f[1]), sum(int(x) for x in f[11:15]) * TICK)
        except (IndexError, ValueError):
            continue
    return out


def tree_cpu(roots: Iterable[int]) -> dict[int, float]:
    """CPU seconds used so far by each root and all its descendants (None-free: a root
    that is gone counts 0)."""
    procs = _scan()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    result: dict[int, float] = {}
    for root in roots:
        total, todo, seen = 0.0, [root], set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in procs:
                continue
            seen.add(pid)
            total += procs[pid][1]
            todo.extend(children.get(pid, ()))
        result[root] = total
    return result

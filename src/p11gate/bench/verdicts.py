"""The bench's verdicts: the ratios of each row to p11-kit server's (and of the pool to
the plain token's, and to the Python floor's), the checks against the targets (CPU per
op, added latency, throughput with N threads or N connections, the pool's CPU), and
the worst cell per target and criterion.

Why a module of its own: the targets are the bench's purpose; their limits and how a
run is judged against them are kept in one place, apart from measuring and output."""

from __future__ import annotations

from .floor_report import floor_ratios
from .results import Check, Result

GATEWAYS = ("process", "none")
RATIOED = (*GATEWAYS, "pool", "soft")  # rows that get ratios to p11-kit server's
# issue targets: added latency at most this multiple of p11-kit server's (1 thread, p50)
LATENCY_LIMIT = {"none": 1.5, "process": 2.0}
# ... server-side CPU time per operation at most this multiple of p11-kit server's
CPU_LIMIT = {"none": 1.5, "process": 2.0}
# ... a pool of two members at most this multiple of the plain (process) token's CPU/op
POOL_CPU_LIMIT = 1.2
# ... throughput with N threads on one connection at least this multiple of p11-kit
# server's, and with N connections at least p11-kit server's
THROUGHPUT_LIMIT = {"throughput-shared": 1.5, "throughput-separate": 1.0}



def shape_name(r: Result) -> str:
    if r.threads == 1:
        return "1 thread"
    if r.connections == 1:
        return f"{r.threads} threads on 1 connection"
    return f"{r.threads} connections"


def analyse(results: list[Result]) -> list[Check]:
    """Fill in the ratios of the rows and return the checks against the targets."""
    by = {(r.target, r.op, r.threads, r.connections): r for r in results}
    floor_ratios(results)
    checks: list[Check] = []
    for r in results:
        cell = (r.op, r.threads, r.connections)
        k = by.get(("p11kit", *cell))
        if r.target != "p11kit" and k and k.cpu_per_op_us and r.cpu_per_op_us is not None:
            r.cpu_ratio = r.cpu_per_op_us / k.cpu_per_op_us
            if r.target in CPU_LIMIT:
                limit = CPU_LIMIT[r.target]
                checks.append(Check(r.target, "cpu", f"{r.op}/{r.threads}x{r.connections}",
                                    r.cpu_ratio, limit, r.cpu_ratio <= limit,
                                    f"{r.target} {r.op} {shape_name(r)}: server CPU per op "
                                    f"vs p11-kit server"))
        if r.target not in RATIOED:
            continue
        if r.target == "pool":
            plain = by.get(("process", *cell))
            if plain and plain.cpu_per_op_us and r.cpu_per_op_us is not None:
                v = r.pool_cpu_ratio = r.cpu_per_op_us / plain.cpu_per_op_us
                checks.append(Check("pool", "pool-cpu", f"{r.op}/{r.threads}x{r.connections}",
                                    v, POOL_CPU_LIMIT, v <= POOL_CPU_LIMIT,
                                    f"pool {r.op} {shape_name(r)}: server CPU per op vs "
                                    f"the plain token (process)"))
        d = by.get(("direct", r.op, 1, 1))
        k1 = by.get(("p11kit", r.op, 1, 1))
        if r.threads == 1 and d and k1 and k1.p50_us > d.p50_us:
            v = (r.p50_us - d.p50_us) / (k1.p50_us - d.p50_us)
            r.added_latency_ratio = v
            if r.target in LATENCY_LIMIT:
                limit = LATENCY_LIMIT[r.target]
                checks.append(Check(r.target, "latency", r.op, v, limit, v <= limit,
                                    f"{r.target} {r.op}: added latency vs p11-kit server"))
        if k and k.ops_per_s > 0:
            r.throughput_ratio = r.ops_per_s / k.ops_per_s
            if r.threads > 1 and r.target in GATEWAYS:
                crit = "throughput-shared" if r.connections == 1 else "throughput-separate"
                v = r.throughput_ratio
                checks.append(Check(r.target, crit, r.op, v, THROUGHPUT_LIMIT[crit],
                                    v >= THROUGHPUT_LIMIT[crit],
                                    f"{r.target} {r.op}: {shape_name(r)} throughput vs "
                                    f"p11-kit server"))
    return checks


CRITERIA = {
    "cpu": "server CPU per op vs p11-kit server",
    "latency": "added latency, 1 thread, p50",
    "throughput-shared": "throughput, N threads on 1 connection",
    "throughput-separate": "throughput, N connections (processes)",
    "pool-cpu": "pool server CPU per op vs plain token",
}
AT_MOST = ("cpu", "latency", "pool-cpu")  # the others are "at least"


def summary(checks: list[Check]) -> list[tuple[str, str, float, str, float, bool, str]]:
    """Per target and criterion: (target, criterion, worst value, worst op, limit, met,
    per-op detail)."""
    out = []
    for target in RATIOED:
        for crit in CRITERIA:
            cs = [c for c in checks if c.target == target and c.criterion == crit]
            if not cs:
                continue
            worst = max(cs, key=lambda c: c.value) if crit in AT_MOST else \
                min(cs, key=lambda c: c.value)
            detail = " ".join(f"{c.op}={c.value:.2f}" for c in cs)
            out.append((target, CRITERIA[crit], worst.value, worst.op, worst.limit,
                        all(c.met for c in cs), detail))
    return out

"""What `p11gate bench` measures and concludes: a cell's :class:`Result`, a
:class:`Check` against a target, a whole :class:`Run`, and :class:`Unavailable` for a
target that could not be started or measured.

Why a module of its own: every part of the bench -- measuring, verdicts, the report,
the JSON output -- reads or writes these records, and none of those parts should have
to import another to get them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    target: str
    op: str
    threads: int  # client threads in total
    connections: int  # 1: all threads in one process on one connection; else one each
    ops_per_s: float
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    calls: int
    errors: int
    first_error: str
    tool: str = "loadgen"
    # CPU time (user + system) over the measured window, per operation completed in it:
    # of the serving processes (for "direct": of the load generator, which holds the
    # module), and of the load generator (the client side) for every target
    cpu_per_op_us: float | None = None
    client_cpu_per_op_us: float | None = None
    cpu_of: str = ""
    completed: int = 0  # operations completed inside the window
    cpu_window_s: float = 0.0  # time between the two CPU samples
    # filled in for the p11gate targets
    added_latency_ratio: float | None = None
    throughput_ratio: float | None = None
    cpu_ratio: float | None = None  # cpu_per_op_us / p11-kit server's, same cell
    pool_cpu_ratio: float | None = None  # pool rows: cpu_per_op_us / process target's
    floor_ratio: float | None = None  # cpu_per_op_us / the floor target's, same cell


@dataclass
class Check:
    target: str
    criterion: str  # "latency" | "throughput-shared" | "throughput-separate"
    op: str
    value: float
    limit: float
    met: bool
    what: str = ""


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    yardstick: list[Result] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed_cells: list[str] = field(default_factory=list)


class Unavailable(Exception):
    """A target could not be started or measured; the message says why."""

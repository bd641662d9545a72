"""Prometheus metrics of one gateway: every name the gateway exports is defined here.

Two kinds of series, both in the gateway's own :class:`CollectorRegistry`:

* **Events counted where they happen**: calls answered and their latency, in plain
  numbers per (token, call) (:class:`CallSeries`, fed by the same hook as ``status``,
  call_stats.py; exported by :class:`CallsCollector`), connections accepted per listener
  and policy denials (``prometheus_client`` counters).
* **State read at scrape time** (:class:`StateCollector`): backend health, pool members,
  sessions, connections open, and the counters the gateway already keeps for ``status``
  (restarts, failovers, replays, refusals, lock-outs, audit failures). The event loop
  builds a snapshot of them (frontend/metrics_state.py); the HTTP side renders it in a
  thread, so nothing that belongs to the loop is read from another thread.

Label values are bounded and hold no secrets: token, backend, pool, member and listener
names come from the configuration, ``call`` from the codec's call table, ``result`` from
the CK_RV names (values the table does not know collapse into two fixed names). There is
no label with a client identity, a PIN or anything a client chooses.

This module sits below the frontend: it imports only the codec and prometheus_client.
"""

from __future__ import annotations

from bisect import bisect_left as _bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .codec import ckr
from .codec.calls import CALLS

# ``*_created`` series would double the count of every counter for a timestamp nobody
# graphs; the gateway's start time is in `status`
prometheus_client.disable_created_metrics()

#: seconds; PKCS#11 calls span ~20 µs (a cached attribute) to minutes (RSA-8192 keygen)
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

#: token label of calls that name no token (C_Initialize, C_GetSlotList, …) or name a
#: session or slot the gateway does not know
NO_TOKEN = ""


def result_label(rv: int) -> str:
    """The CKR name of ``rv``; values outside the table are folded into two names so a
    module returning arbitrary codes cannot grow the label set."""
    name = ckr.NAMES.get(rv)
    if name is not None:
        return name
    return "CKR_VENDOR_DEFINED" if rv >= 0x80000000 else "CKR_UNKNOWN"


@dataclass(frozen=True)
class StateMetric:
    name: str  # without the _total suffix of counters
    kind: str  # "gauge" | "counter"
    help: str
    labels: tuple[str, ...]


#: every series read at scrape time, by name
STATE_METRICS: dict[str, StateMetric] = {m.name: m for m in (
    StateMetric("p11gate_backend_up", "gauge",
                "1 while the backend (worker or in-process module) serves calls", ("backend",)),
    StateMetric("p11gate_backend_restarts", "counter",
                "Worker restarts after a crash, a hang or a missed deadline", ("backend",)),
    StateMetric("p11gate_pool_member_up", "gauge",
                "1 while the pool member is usable", ("pool", "member")),
    StateMetric("p11gate_pool_member_downs", "counter",
                "Times the pool member was marked down", ("pool", "member")),
    StateMetric("p11gate_pool_failovers", "counter",
                "Calls moved off this member to another one after it failed",
                ("pool", "member")),
    StateMetric("p11gate_pool_replays", "counter",
                "Operations interrupted on this member and replayed on another",
                ("pool", "member")),
    StateMetric("p11gate_pool_member_outstanding", "gauge",
                "Calls in flight on the pool member", ("pool", "member")),
    StateMetric("p11gate_backend_sessions_open", "gauge",
                "Backend sessions a pool member has open (control session included)",
                ("pool", "member")),
    StateMetric("p11gate_backend_sessions_leased", "gauge",
                "Backend sessions of a pool member leased to an operation or call",
                ("pool", "member")),
    StateMetric("p11gate_backend_session_waiters", "gauge",
                "Callers queued for a backend session of a pool member", ("pool", "member")),
    StateMetric("p11gate_fair_share_waiting", "gauge",
                "Calls queued behind their identity's fair share of a backend or pool",
                ("backend",)),
    StateMetric("p11gate_fair_share_in_flight", "gauge",
                "Calls the fair share has handed to a backend and not seen end, all "
                "identities together (at most the backend's threads)", ("backend",)),
    StateMetric("p11gate_client_sessions", "gauge",
                "Sessions clients have open, per token", ("token",)),
    StateMetric("p11gate_connections", "gauge",
                "Client connections open, per listener", ("listener",)),
    StateMetric("p11gate_connections_refused", "counter",
                "Connections closed at once: beyond a limit (max_connections, per "
                "identity, fd_reserve) or without an identity", ("reason",)),
    StateMetric("p11gate_tls_handshakes_refused", "counter",
                "TLS handshakes refused (no, untrusted or revoked certificate, old protocol, "
                "timeout)", ("listener",)),
    StateMetric("p11gate_pin_lockouts", "counter",
                "Lock-outs after max_pin_failures wrong PINs in a row (per identity, or the "
                "token's backend PIN attempts)", ("token",)),
    StateMetric("p11gate_audit_write_failures", "counter",
                "Audit records that could not be written", ()),
)}

#: a state sample: metric name → [(label values, value)]
Snapshot = dict[str, list[tuple[tuple[str, ...], float]]]


class StateCollector(Collector):
    """Yields the latest snapshot the event loop made (see module docstring); a name
    with no sample still appears (HELP and TYPE), so dashboards and tests see every
    name from the first scrape."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        for m in STATE_METRICS.values():
            fam: GaugeMetricFamily | CounterMetricFamily
            if m.kind == "gauge":
                fam = GaugeMetricFamily(m.name, m.help, labels=m.labels)
            else:
                fam = CounterMetricFamily(m.name, m.help, labels=m.labels)
            for values, v in snap.get(m.name, ()):
                fam.add_metric(list(values), v)
            yield fam

    def describe(self) -> Iterator[Metric]:
        saved, self.snapshot = self.snapshot, {}
        try:
            yield from self.collect()
        finally:
            self.snapshot = saved


class CallSeries:
    """The calls answered for one (token, call) and their latencies, in plain numbers:
    a reply costs a bisect, three additions and a dict update (no locks, no
    prometheus_client calls, about a microsecond). :class:`CallsCollector` turns them
    into the ``p11gate_calls`` counter and ``p11gate_call_duration_seconds`` histogram
    at scrape time (reading them from another thread is safe: each value is one object
    replaced whole; a scrape may see a call in the count and not yet in the sum, as
    prometheus_client's own histogram can)."""

    __slots__ = ("by_rv", "call", "counts", "sum", "token")

    def __init__(self, token: str, call: str) -> None:
        self.token = token
        self.call = call
        #: CK_RV → calls answered with it
        self.by_rv: dict[int, int] = {}
        #: per bucket of _BOUNDS (not cumulative; the last is +Inf)
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0

    def done(self, seconds: float, rv: int) -> None:
        self.counts[_bisect(_BOUNDS, seconds)] += 1
        self.sum += seconds
        by_rv = self.by_rv
        n = by_rv.get(rv)
        if n is None and len(by_rv) >= MAX_RESULTS and rv not in ckr.NAMES:
            # a module returning ever new codes must not grow this dict (the labels
            # fold them anyway): counted under the name they are exported with
            rv = _FOLDED_VENDOR if rv >= 0x80000000 else _FOLDED_UNKNOWN
            n = by_rv.get(rv)
        by_rv[rv] = (n or 0) + 1


#: distinct CK_RVs kept per series before codes outside the table are folded in done()
MAX_RESULTS = 64
#: the codes folded values are counted under (result_label gives each its fixed name)
_FOLDED_VENDOR = 0xFFFFFFFF
_FOLDED_UNKNOWN = 0x7FFFFFFF

#: the buckets' upper bounds, +Inf last: a value v falls into the first bound >= v
_BOUNDS = (*DURATION_BUCKETS, float("inf"))

CALLS_HELP = "PKCS#11 calls answered, by token, function and result (CKR name)"
DURATION_HELP = "Seconds from a request's decoding to its reply's hand-off to the socket"


class CallsCollector(Collector):
    """``p11gate_calls_total`` and ``p11gate_call_duration_seconds`` from the
    gateway's :class:`CallSeries`."""

    def __init__(self, series: dict[tuple[str, int], CallSeries]) -> None:
        self._series = series

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("p11gate_calls", CALLS_HELP,
                                    labels=("token", "call", "result"))
        duration = HistogramMetricFamily("p11gate_call_duration_seconds", DURATION_HELP,
                                         labels=("token", "call"))
        for s in list(self._series.values()):  # one C call: safe against the loop adding
            by_label: dict[str, int] = {}
            for rv, n in list(s.by_rv.items()):
                label = result_label(rv)
                by_label[label] = by_label.get(label, 0) + n
            for label, n in by_label.items():
                calls.add_metric([s.token, s.call, label], n)
            counts = list(s.counts)
            total = 0
            buckets = []
            for bound, n in zip(_BOUNDS, counts, strict=True):
                total += n
                buckets.append((floatToGoString(bound), total))
            duration.add_metric([s.token, s.call], buckets, s.sum)
        yield calls
        yield duration


def _call_name(call_id: int) -> str:
    return CALLS[call_id].name if 0 <= call_id < len(CALLS) else "unknown"


class GatewayMetrics:
    """The registry one gateway exports, and the hooks the gateway calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._series: dict[tuple[str, int], CallSeries] = {}
        r.register(CallsCollector(self._series))
        self.connections_accepted = Counter(
            "p11gate_connections_accepted", "Client connections accepted, per listener "
            "(TLS: handshake passed)", ("listener",), registry=r)
        self.policy_denials = Counter(
            "p11gate_policy_denials", "Calls refused by policy (rules, namespaces)",
            ("token",), registry=r)
        self.state = StateCollector()
        r.register(self.state)
        #: connections closed in connection_made for want of an identity (status has none)
        self.identity_refused = 0

    def series(self, token: str, call_id: int) -> CallSeries:
        key = (token, call_id)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = CallSeries(token, _call_name(call_id))
        return s

    def names(self) -> Iterable[str]:
        """Every sample name the registry can export (``_total``, ``_bucket``, …)."""
        suffixes = {"counter": ("_total",), "gauge": ("",),
                    "histogram": ("_bucket", "_count", "_sum")}
        for fam in self.registry.collect():
            for s in suffixes.get(fam.type, ("",)):
                yield fam.name + s

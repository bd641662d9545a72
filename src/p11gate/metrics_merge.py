"""The metrics of ``[server] processes = N``: one endpoint for all the processes.

The supervisor serves ``[metrics] listen``; on each scrape it asks every gateway process
for its samples over that process's admin socket (``metrics``: the families of its
registry as JSON, see :func:`export`) and merges them (:class:`MergedCollector`):

* counters and histograms (buckets, ``_count``, ``_sum``) are summed: calls, refusals and
  restarts of all processes together;
* gauges of things that exist per process (connections, sessions, calls in flight) are
  summed too;
* ``*_up`` gauges are the minimum: 1 only while the back end or member is up in every
  process (one process's dead worker shows as 0, not as "N-1 up");
* ``/metrics?per_process=1`` leaves the samples apart instead, with a ``process`` label
  (the process index), for finding the one process that misbehaves.

A process that does not answer (it is restarting) is left out of that scrape and counted
in ``p11gate_metrics_processes_missing``; counters then dip for one scrape, which
Prometheus' ``rate()`` treats as a reset, as after any restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: one family as it crosses the admin socket: name, type, help, [(sample, labels, value)]
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def export(registry: CollectorRegistry) -> list[Family]:
    """A process's registry, for the supervisor (JSON-able)."""
    return [(fam.name, fam.type, fam.documentation,
             [(s.name, dict(s.labels), float(s.value)) for s in fam.samples])
            for fam in registry.collect()]


def _is_min(name: str, kind: str) -> bool:
    return kind == "gauge" and name.endswith("_up")


class MergedCollector(Collector):
    """The families of several processes (index → families), merged or labelled."""

    def __init__(self, parts: dict[int, list[Family]], missing: int,
                 per_process: bool) -> None:
        self.parts = parts
        self.missing = missing
        self.per_process = per_process

    def collect(self) -> Iterator[Metric]:
        order: list[str] = []
        meta: dict[str, tuple[str, str]] = {}
        #: family → (sample name, labels) → value, in first-seen order
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for index, families in sorted(self.parts.items()):
            for name, kind, doc, samples in families:
                if name not in meta:
                    meta[name] = (kind, doc)
                    order.append(name)
                    values[name] = {}
                into = values[name]
                for sample, labels, value in samples:
                    named = (("process", str(index)),) if self.per_process else ()
                    key = (sample, named + tuple(labels.items()))
                    if key not in into:
                        into[key] = value
                    elif _is_min(name, kind):
                        into[key] = min(into[key], value)
                    else:
                        into[key] += value
        for name in order:
            kind, doc = meta[name]
            fam = Metric(name, doc, kind)
            for (sample, pairs), total in values[name].items():
                fam.add_sample(sample, dict(pairs), total)
            yield fam
        gone = GaugeMetricFamily(
            "p11gate_metrics_processes_missing",
            "Gateway processes that did not answer this scrape (restarting)")
        gone.add_metric([], float(self.missing))
        yield gone


def merged_registry(parts: dict[int, list[Family]], missing: int,
                    per_process: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(parts, missing, per_process))
    return registry


def families(data: Any) -> list[Family]:
    """The ``metrics`` answer of a process's admin socket, checked for shape (it comes
    from our own child, but a malformed one must not break the scrape of the others)."""
    out: list[Family] = []
    for item in data if isinstance(data, list) else []:
        name, kind, doc, samples = item
        out.append((str(name), str(kind), str(doc),
                    [(str(s), {str(k): str(v) for k, v in labels.items()}, float(v))
                     for s, labels, v in samples]))
    return out

"""The merge of several gateway processes' metrics (metrics_merge.py): counters and
histograms summed, ``*_up`` gauges the minimum, per-process samples labelled on request,
both exposition formats, and a malformed answer refused rather than half-read."""

from __future__ import annotations

import json

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from p11gate.metrics import GatewayMetrics
from p11gate.metrics_merge import export, families, merged_registry


def _process(calls: int, up: float, connections: int) -> GatewayMetrics:
    m = GatewayMetrics()
    for _ in range(calls):
        m.series("signing", 64).done(0.0003, 0)  # 64: C_GenerateRandom
    m.state.snapshot = {"p11gate_backend_up": [(("softhsm",), up)],
                        "p11gate_connections": [(("unix:path=/s",), float(connections))]}
    return m


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _parts() -> dict[int, list]:
    # what crosses the admin socket is JSON: the merge reads it back through families()
    return {i: families(json.loads(json.dumps(export(m.registry))))
            for i, m in enumerate((_process(3, 1.0, 2), _process(4, 0.0, 5)))}


def test_counters_and_histograms_are_summed_and_up_is_the_minimum() -> None:
    got = _samples(generate_latest(merged_registry(_parts(), 0, False)).decode())
    ok = frozenset({"token": "signing", "call": "C_GenerateRandom",
                    "result": "CKR_OK"}.items())
    assert got[("p11gate_calls_total", ok)] == 7
    tc = frozenset({"token": "signing", "call": "C_GenerateRandom"}.items())
    assert got[("p11gate_call_duration_seconds_count", tc)] == 7
    assert got[("p11gate_call_duration_seconds_bucket", tc | {("le", "+Inf")})] == 7
    assert got[("p11gate_backend_up", frozenset({("backend", "softhsm")}))] == 0
    assert got[("p11gate_connections", frozenset({("listener", "unix:path=/s")}))] == 7
    assert got[("p11gate_metrics_processes_missing", frozenset())] == 0


def test_per_process_keeps_each_process_apart() -> None:
    got = _samples(generate_latest(merged_registry(_parts(), 1, True)).decode())
    up = {dict(k[1])["process"]: v for k, v in got.items() if k[0] == "p11gate_backend_up"}
    assert up == {"0": 1.0, "1": 0.0}
    assert got[("p11gate_metrics_processes_missing", frozenset())] == 1


def test_openmetrics_rendering_of_the_merge() -> None:
    text = generate_openmetrics(merged_registry(_parts(), 0, False)).decode()
    assert text.endswith("# EOF\n")
    assert 'p11gate_calls_total{call="C_GenerateRandom",result="CKR_OK",token="signing"} 7.0' \
        in text


@pytest.mark.parametrize("junk", [
    [["p11gate_calls", "counter", "h"]],  # a family without samples
    [["p11gate_calls", "counter", "h", [["x", ["not", "a", "dict"], 1]]]],
    [["p11gate_calls", "counter", "h", [["x", {}, "many"]]]],
])
def test_a_malformed_answer_is_refused(junk: object) -> None:
    with pytest.raises((ValueError, TypeError, AttributeError)):
        families(junk)

"""The Grafana dashboard draws only metrics the gateway exports, and the metrics module
keeps its promises (bounded labels, cached children, [metrics] config)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from p11gate.codec import CALLS_BY_NAME
from p11gate.config import ConfigError, parse_config
from p11gate.metrics import STATE_METRICS, GatewayMetrics, result_label

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "p11gate.json"

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and grouping lists that are not functions or keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges ($__rate_interval, 5m)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)  # dashboard variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group().lower() in _PROMQL_WORDS:
            continue  # a function or an aggregation
        names.add(m.group())
    return names


def _expressions(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            # label_values(metric, label): the metric is the first argument
            m = re.match(r"label_values\(\s*([A-Za-z_:][\w:]*)", q.get("query", ""))
            if m:
                exprs.append(m.group(1))
    return exprs


def test_metric_names_parser() -> None:
    got = metric_names('histogram_quantile(0.99, sum by (le, call) (rate('
                       'p11gate_call_duration_seconds_bucket{token=~"$token"}[$__rate_interval])))'
                       ' / on (x) foo_total')
    assert got == {"p11gate_call_duration_seconds_bucket", "foo_total"}


def test_dashboard_uses_only_exported_names() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exported = set(GatewayMetrics().names())
    exprs = _expressions(dash)
    assert len(exprs) >= 20
    used: set[str] = set()
    for e in exprs:
        names = metric_names(e)
        assert names, f"no metric in {e!r}"
        missing = names - exported
        assert not missing, f"{e!r} uses {sorted(missing)}, not exported"
        used |= names
    # what the dashboard is for: rate, quantiles over the buckets, errors, member health
    assert {"p11gate_calls_total", "p11gate_call_duration_seconds_bucket",
            "p11gate_pool_member_up", "p11gate_backend_up",
            "p11gate_backend_restarts_total", "p11gate_pool_failovers_total"} <= used
    assert any("histogram_quantile" in e and "_bucket" in e for e in exprs)
    assert any('result!="CKR_OK"' in e for e in exprs)
    # every panel id unique, every target has a refId (Grafana needs both)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["refId"] for p in dash["panels"] for t in p["targets"])


def test_registry_exports_every_name_with_help_before_any_call() -> None:
    m = GatewayMetrics()
    text = generate_latest(m.registry).decode()
    for name, spec in STATE_METRICS.items():
        full = name + ("_total" if spec.kind == "counter" else "")
        assert f"# TYPE {full} {spec.kind}" in text, full
    assert "# TYPE p11gate_call_duration_seconds histogram" in text
    assert "_created" not in text


def test_call_series_are_cached_and_results_bounded() -> None:
    m = GatewayMetrics()
    sign = CALLS_BY_NAME["C_Sign"].id
    s = m.series("t", sign)
    assert m.series("t", sign) is s
    for rv in (0, 0, 0xA0, 0x80000001, 0x80000002, 0x7777):
        s.done(0.001, rv)
    text = generate_latest(m.registry).decode()
    assert 'p11gate_calls_total{call="C_Sign",result="CKR_OK",token="t"} 2.0' in text
    assert 'result="CKR_PIN_INCORRECT"' in text
    assert 'p11gate_calls_total{call="C_Sign",result="CKR_VENDOR_DEFINED",token="t"} 2.0' in text
    assert 'result="CKR_UNKNOWN"' in text
    assert 'p11gate_call_duration_seconds_count{call="C_Sign",token="t"} 6.0' in text
    assert result_label(0x1B) == "CKR_ACTION_PROHIBITED"


BASE = {"backend": [{"name": "b", "module": "/usr/lib/softhsm/libsofthsm2.so"}],
        "token": [{"name": "t", "backend": "b", "select": {"label": "x"}}]}


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:9464", "localhost:0",
                                    "unix:path=/run/p11gate/metrics.sock"])
def test_metrics_listen_accepted(listen: str) -> None:
    assert parse_config({**BASE, "metrics": {"listen": listen}}).metrics.listen == listen


def test_metrics_off_by_default_in_config() -> None:
    assert parse_config(dict(BASE)).metrics.listen is None


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:http", "unix:/rel", "unix:path=rel",
                                    "[::1:9464", "127.0.0.1:70000"])
def test_metrics_listen_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config({**BASE, "metrics": {"listen": listen}})


def test_unknown_metrics_key_refused() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        parse_config({**BASE, "metrics": {"port": 9464}})


@pytest.mark.parametrize(("listen", "warned"), [
    ("127.0.0.1:9464", False), ("[::1]:9464", False), ("localhost:9464", False),
    ("unix:path=/run/p11gate/metrics.sock", False), ("0.0.0.0:9464", True),
    ("10.1.2.3:9464", True)])
def test_metrics_beyond_loopback_warned(listen: str, warned: bool) -> None:
    from p11gate.config_checks import metrics_exposure
    from p11gate.config_report import describe

    cfg = parse_config({**BASE, "metrics": {"listen": listen}})
    assert bool(metrics_exposure(cfg)) is warned
    assert f"metrics: {listen} (GET /metrics)" in describe(cfg)

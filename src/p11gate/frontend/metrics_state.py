"""The state half of the metrics (see metrics.py): read on the event loop at each scrape
from the objects that already keep it for `status`, so the hot paths carry no extra
hooks for gauges. Every label value here is a configured name."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ..metrics import Snapshot
from .tls_listener import TlsListener

if TYPE_CHECKING:
    from ..gateway import Gateway


def snapshot(gw: Gateway) -> Snapshot:
    s: Snapshot = {name: [] for name in (
        "p11gate_backend_up", "p11gate_backend_restarts", "p11gate_pool_member_up",
        "p11gate_pool_member_downs", "p11gate_pool_failovers", "p11gate_pool_replays",
        "p11gate_pool_member_outstanding", "p11gate_backend_sessions_open",
        "p11gate_backend_sessions_leased", "p11gate_backend_session_waiters",
        "p11gate_fair_share_waiting", "p11gate_fair_share_in_flight",
        "p11gate_client_sessions", "p11gate_connections",
        "p11gate_connections_refused", "p11gate_tls_handshakes_refused",
        "p11gate_pin_lockouts", "p11gate_audit_write_failures")}
    for b in gw.backends.values():
        s["p11gate_backend_up"].append(((b.name,), float(b.up)))
        # in-process modules are never restarted (a crash takes the gateway): always 0
        s["p11gate_backend_restarts"].append(((b.name,), float(getattr(b, "restarts", 0))))
    for p in gw.pools.values():
        for m in p.members:
            key = (p.name, m.name)
            s["p11gate_pool_member_up"].append((key, float(m.usable)))
            s["p11gate_pool_member_downs"].append((key, float(m.downs)))
            s["p11gate_pool_failovers"].append((key, float(m.failovers)))
            s["p11gate_pool_replays"].append((key, float(m.replays)))
            s["p11gate_pool_member_outstanding"].append((key, float(m.outstanding)))
            opened = m.open + (1 if m.control is not None else 0)
            s["p11gate_backend_sessions_open"].append((key, float(opened)))
            s["p11gate_backend_sessions_leased"].append((key, float(m.leased)))
            s["p11gate_backend_session_waiters"].append((key, float(m.waiting)))
    for share in gw.fair_share.describe():
        s["p11gate_fair_share_waiting"].append(
            ((share["backend"],), float(sum(share["waiting"].values()))))
        s["p11gate_fair_share_in_flight"].append(
            ((share["backend"],), float(share["in_flight_total"])))
    sessions: Counter[str] = Counter({t.name: 0 for t in gw.tokens})
    listeners: Counter[str] = Counter({a: 0 for a in gw.cfg.server.listen})
    for c in gw.connections:
        listeners[c.listener] += 1
        for sess in c.handles.sessions.values():
            sessions[sess.token.name] += 1
    s["p11gate_client_sessions"] = [((k,), float(v)) for k, v in sessions.items()]
    s["p11gate_connections"] = [((k,), float(v)) for k, v in listeners.items() if k]
    s["p11gate_connections_refused"] = [
        (("limit",), float(gw.limits.refused)),
        (("identity",), float(gw.metrics.identity_refused))]
    s["p11gate_tls_handshakes_refused"] = [
        ((srv.address,), float(srv.refused)) for srv in gw._servers
        if isinstance(srv, TlsListener)]
    s["p11gate_pin_lockouts"] = [((t.name,), float(t.throttle.lockouts)) for t in gw.tokens]
    s["p11gate_audit_write_failures"] = [((), float(gw.audit.failures))]
    return s

"""`p11gate status` for people: a few short tables made from the status JSON.

Pure formatting (no I/O), so the same text can be checked by tests and piped to `less`.
Slot ids are shown in hex as pkcs11-tool shows them; every value that came from a
client or a module (names of peers, error texts) is escaped to one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .textsafe import one_line


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[one_line(str(c)) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        out.append((indent + "  ".join(padded)).rstrip())
    return out


def duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s"


def _token_state(t: dict[str, Any]) -> str:
    return "present" if t.get("present") else "absent"


def _why(text: Any) -> str:
    return str(text) if text else "-"


def limits_hit(st: dict[str, Any]) -> list[tuple[str, int]]:
    """Every refusal counter the status carries (whatever branch added it): top-level
    ``*_refused`` counts and the fair-share books' ``refused_total``."""
    hits = [(k.removesuffix("_refused").replace("_", " ") + " refused", v)
            for k, v in st.items() if k.endswith("_refused") and isinstance(v, int)]
    fair = st.get("fair_share")
    if isinstance(fair, list):
        refused = sum(int(f.get("refused_total", 0)) for f in fair if isinstance(f, dict))
        hits.append(("calls refused by fair share", refused))
    if isinstance(st.get("audit_failures"), int):
        hits.append(("audit write failures", st["audit_failures"]))
    return hits


def render(st: dict[str, Any]) -> str:
    lines = [
        f"p11gate {st.get('version', '?')}  pid {st.get('pid', '?')}  "
        f"up {duration(float(st.get('uptime_s', 0)))} (since {st.get('started', '?')})",
        "listeners: " + (", ".join(st.get("listeners", [])) or "none"),
    ]
    clients = st.get("clients", [])
    lines.append(f"clients: {st.get('connections', 0)} connections from "
                 f"{len(clients)} identities" + (f" ({', '.join(clients)})" if clients else ""))
    tokens = st.get("tokens", [])
    lines += ["", "tokens:"]
    lines += table(
        ("NAME", "SLOT", "STATE", "BACKEND", "PIN MODE", "LOGGED IN", "CALLS", "ERRORS", "URI"),
        [(t["name"], t.get("slot_hex", hex(t.get("slot", 0))), _token_state(t), t["backend"],
          t.get("pin_mode", "?"), t.get("logged_in_clients", 0),
          t.get("stats", {}).get("calls", "-"), t.get("stats", {}).get("errors", "-"),
          t.get("uri", "-")) for t in tokens])
    for t in tokens:
        if t.get("last_error"):
            lines.append(f"  {t['name']}: {one_line(str(t['last_error']))}")
    backends = st.get("backends", [])
    if backends:
        lines += ["", "backends:"]
        lines += table(
            ("NAME", "STATE", "ISOLATION", "PID", "RESTARTS", "WHY"),
            [(b["name"], "up" if b.get("up") else "down", b.get("isolation", "?"),
              b.get("pid") or "-", b.get("restarts", 0), _why(b.get("last_error")))
             for b in backends])
    for p in st.get("pools", []):
        lines += ["", f"pool {p['name']} ({'up' if p.get('up') else 'down'}, "
                      f"replication {p.get('replication', '?')}, failovers "
                      f"{p.get('failovers', 0)}, replays {p.get('replays', 0)}):"]
        lines += table(
            ("MEMBER", "STATE", "CALLS", "LATENCY", "SESSIONS", "WHY"),
            [(m["backend"], m.get("state", "?"), m.get("calls", 0),
              f"{m.get('latency_ms', 0)} ms", m.get("sessions_open", 0),
              _why(m.get("down_reason"))) for m in p.get("members", [])])
    hits = limits_hit(st)
    hit = [f"{what} {n}" for what, n in hits if n]
    lines += ["", "limits hit: " + (", ".join(hit) if hit else "none")]
    return "\n".join(lines) + "\n"

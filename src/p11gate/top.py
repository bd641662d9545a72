"""`p11gate top`: calls/s, latency, errors and member health per token, live.

Reads the admin socket's status once per interval; rates and mean latencies are the
differences between two reads of the per-token counters (status never resets them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .status_view import duration
from .textsafe import one_line

Status = dict[str, Any]


def _health(st: Status, backend: str) -> Text:
    """The state of what serves a token: its backend, or each member of its pool."""
    for p in st.get("pools", []):
        if p.get("name") == backend:
            out = Text()
            for i, m in enumerate(p.get("members", [])):
                if i:
                    out.append("  ")
                up = m.get("state") == "up"
                out.append(f"{m.get('backend')} {m.get('state')}",
                           style="green" if up else "bold red")
                if not up and m.get("down_reason"):
                    out.append(f" ({one_line(str(m['down_reason']))[:40]})", style="red")
            return out
    for b in st.get("backends", []):
        if b.get("name") == backend:
            if b.get("up"):
                n = b.get("restarts", 0)
                return Text(f"{backend} up" + (f" ({n} restarts)" if n else ""), style="green")
            why = one_line(str(b.get("last_error") or "down"))[:40]
            return Text(f"{backend} down ({why})", style="bold red")
    return Text(backend)


def view(st: Status, prev: Status | None, dt: float) -> Table:
    table = Table(title=f"p11gate {st.get('version', '?')} — up "
                        f"{duration(float(st.get('uptime_s', 0)))} — "
                        f"{st.get('connections', 0)} connections",
                  title_justify="left", expand=False)
    names = [one_line(t["name"]) for t in st.get("tokens", [])]
    # names and numbers are never cut short; a narrow terminal folds the health column
    table.add_column("TOKEN", no_wrap=True, min_width=max(map(len, names), default=5))
    table.add_column("SLOT", no_wrap=True, min_width=10)
    for col in ("CALLS/S", "ERR/S", "LATENCY", "CALLS", "ERRORS"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    table.add_column("HEALTH", overflow="fold")
    before = {t["name"]: t.get("stats", {}) for t in (prev or {}).get("tokens", [])}
    for t in st.get("tokens", []):
        now = t.get("stats", {})
        was = before.get(t["name"])
        calls, errors = now.get("calls", 0), now.get("errors", 0)
        if was is not None and dt > 0:
            d_calls = calls - was.get("calls", 0)
            d_err = errors - was.get("errors", 0)
            d_lat = now.get("latency_total_s", 0.0) - was.get("latency_total_s", 0.0)
            rate, err_rate = f"{d_calls / dt:.1f}", f"{d_err / dt:.1f}"
            latency = f"{d_lat / d_calls * 1000:.2f} ms" if d_calls > 0 else "-"
        else:
            rate = err_rate = latency = "…"
        name = Text(one_line(t["name"]), style="bold" if t.get("present") else "bold red")
        table.add_row(name, t.get("slot_hex", "?"), rate,
                      Text(err_rate, style="red" if err_rate not in ("…", "0.0") else ""),
                      latency, str(calls), str(errors), _health(st, t.get("backend", "?")))
    return table


def run(fetch: Callable[[], Status], interval: float, iterations: int | None) -> None:
    prev: Status | None = None
    prev_t = 0.0
    with Live(Text("connecting…"), refresh_per_second=4, screen=False) as live:
        n = 0
        while iterations is None or n < iterations:
            n += 1
            t = time.monotonic()
            try:
                st = fetch()
            except OSError as e:
                live.update(Text(f"cannot reach the gateway: {e.strerror or e}", style="red"))
                prev = None
            else:
                live.update(Group(view(st, prev, t - prev_t),
                                  Text("calls/s and latency over the last "
                                       f"{interval:g} s; Ctrl-C quits", style="dim")))
                prev, prev_t = st, t
            time.sleep(max(0.0, interval - (time.monotonic() - t)))

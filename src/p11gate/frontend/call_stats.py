"""Per-token call counters for `p11gate status` and `p11gate top`.

Three numbers per token — calls answered, calls answered with an error, and the sum of
their latencies — kept in plain attributes: a reply costs a dict pop, a clock read and
three additions (about a microsecond). Rates and mean latencies are differences between
two reads of `status` (what `top` does each second); nothing is reset by reading, so
several readers do not disturb each other. The Prometheus metrics (metrics.py) are fed
from the same two hooks, with the same clock reads.

A call is counted on the token its first argument names (a slot, or a session on one);
calls that name no token (C_Initialize, C_GetInfo, C_GetSlotList, …) are not counted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..codec import reply_rv
from ..metrics import NO_TOKEN
from .tables import SESSION_CALLS, SLOT_CALLS

if TYPE_CHECKING:
    from .connection import ClientConnection

_clock = time.perf_counter


class CallStats:
    __slots__ = ("calls", "errors", "latency_total")

    def __init__(self) -> None:
        self.calls = 0
        #: answered with any CK_RV other than CKR_OK
        self.errors = 0
        #: seconds, from the request's decoding to its reply's hand-off to the socket
        self.latency_total = 0.0

    def describe(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": self.errors,
                "latency_total_s": round(self.latency_total, 6)}


def started(conn: ClientConnection, code: int, call_id: int, args: list[Any]) -> None:
    """Note a decoded request (frame ``code``) on the token it names. Every call is
    noted for the Prometheus metrics (a call naming no known token under token ""); only
    calls on a token count for `status`."""
    t = None
    if call_id in SESSION_CALLS:
        s = conn.handles.sessions.get(args[0])
        if s is not None:
            t = s.token
    elif call_id in SLOT_CALLS:
        t = conn.gw.tokens_by_slot.get(args[0])
        if t is not None and t not in conn.grants:
            # a token this identity may not see: its calls are refused with
            # CKR_SLOT_ID_INVALID, and must not move that token's figures either
            t = None
    if t is None:
        conn.call_started[code] = (None, _clock(), conn.gw.metrics.series(NO_TOKEN, call_id))
    else:
        conn.call_started[code] = (t.stats, _clock(), conn.gw.metrics.series(t.name, call_id))


def answered(conn: ClientConnection, code: int, body: bytes) -> None:
    """Count the reply to frame ``code`` (if its request was noted)."""
    noted = conn.call_started.pop(code, None)
    if noted is None:
        return
    stats, t0, series = noted
    seconds = _clock() - t0
    rv = reply_rv(body)
    series.done(seconds, rv)  # the Prometheus counter and histogram: same clock reads
    if stats is None:
        return
    stats.calls += 1
    stats.latency_total += seconds
    if rv:
        stats.errors += 1

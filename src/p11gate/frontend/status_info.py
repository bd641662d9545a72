"""What `status` says about the gateway itself and about each token, beyond counts:
version, uptime, listeners, and each token's URI, slot id in hex and call counters."""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..gateway import Gateway
    from .token import VirtualToken


def _version() -> str:
    try:
        return version("p11gate")
    except PackageNotFoundError:
        return "unknown"


class StartTime:
    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = time.monotonic()


def gateway_header(gw: Gateway, started: StartTime) -> dict[str, Any]:
    return {
        "version": _version(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started.wall)),
        "uptime_s": round(time.monotonic() - started.mono, 1),
        "listeners": list(gw.cfg.server.listen),
    }


def token_extras(t: VirtualToken) -> dict[str, Any]:
    return {"slot_hex": f"{t.slot_id:#x}", "uri": t.uri, "stats": t.stats.describe()}

"""Passing one future's outcome on to another, in done-callbacks (no task per call)."""

from __future__ import annotations

import asyncio
from typing import Any


def passed_on(f: asyncio.Future[Any], out: asyncio.Future[Any]) -> bool:
    """In ``f``'s done-callback: True when there is nothing left to do with ``f``'s
    result: ``out`` was already settled (cancelled, expired), or ``f`` failed and its
    exception is now ``out``'s."""
    if out.done():
        return True
    exc = f.exception()
    if exc is not None:
        out.set_exception(exc)
        return True
    return False

"""A worker's own words, where the operator looks: its stderr becomes log records, and
failed restarts are logged a few times and then summarised.

A worker's stderr (the loader's error, a vendor module's messages, anything the module
prints to stdout, which the worker points at stderr) is a pipe the gateway reads on its
event loop: one record per line, with the backend's name and the worker's pid. Lines are
cut at ``MAX_LINE`` characters and at most ``LINE_BURST`` lines per second are logged one
by one (the rest are counted in a summary record), so a chatty or hostile module cannot
flood the log; the pipe is always drained, so a module never blocks on a full pipe.

``RestartFailures`` keeps a module that cannot start (not a PKCS#11 module, a missing
token) from writing a record every few seconds forever: the first failures are logged
one by one, then one summary per ``SUMMARY_EVERY`` seconds with their count and the last
reason; the worker output of summarised attempts is kept (the last lines, for
``last_error``) but not logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

log = logging.getLogger("p11gate.backend")

#: characters of one line kept in a record; the rest of the line is dropped
MAX_LINE = 2000
#: lines logged one by one per second and worker; the rest are counted
LINE_BURST = 20
#: failed restarts in a row that are logged one by one
LOG_FIRST = 3
#: seconds between two summaries of a backend that keeps failing to restart
SUMMARY_EVERY = 60.0
#: after this many seconds of failing, restarts are tried at most this often
LONG_FAILURE = 60.0
LONG_FAILURE_DELAY = 30.0


class WorkerOutput:
    """Reads one worker's stderr until it ends, logging each line."""

    def __init__(self, backend: str, pid: int, stream: asyncio.StreamReader,
                 verbose: Callable[[], bool] = lambda: True) -> None:
        self.backend = backend
        self.pid = pid
        self.verbose = verbose
        #: the last lines, for the backend's last_error
        self.last_lines: collections.deque[str] = collections.deque(maxlen=4)
        self._prefix = f"p11gate worker[{pid}]: "
        self._window = 0.0
        self._in_window = 0
        self._suppressed = 0
        self.task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        buf = b""
        skipping = False  # inside an over-long line whose head was logged already
        try:
            while chunk := await stream.read(65536):
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = buf[:nl], buf[nl + 1:]
                    if not skipping:
                        self._line(line)
                    skipping = False
                if len(buf) > 4 * MAX_LINE:
                    if not skipping:
                        self._line(buf)
                    buf, skipping = b"", True
            if buf and not skipping:
                self._line(buf)
        except (OSError, ValueError) as e:  # the pipe broke: nothing more to read
            log.debug("worker output ended", extra={"backend": self.backend,
                                                    "pid": self.pid, "error": str(e)})
        finally:
            self._flush_suppressed()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not text.strip():
            return
        text = text.removeprefix(self._prefix)  # the pid is a field of its own
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + "…"
        self.last_lines.append(text)
        if not self.verbose():
            return
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._flush_suppressed()
            self._window, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > LINE_BURST:
            if not self._suppressed:  # the count is logged at the latest in a second
                asyncio.get_running_loop().call_later(1.0, self._flush_suppressed)
            self._suppressed += 1
            return
        log.warning("worker output", extra={"backend": self.backend, "pid": self.pid,
                                            "line": text})

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            log.warning("worker output lines not logged one by one",
                        extra={"backend": self.backend, "pid": self.pid,
                               "count": self._suppressed})
            self._suppressed = 0

    async def finished(self, timeout: float) -> None:
        """Wait (a little) until everything the worker wrote has been read."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            pass

    def last(self) -> str:
        return self.last_lines[-1] if self.last_lines else ""


class RestartFailures:
    """Counts one backend's failed (re)starts in a row and decides what is logged."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.streak = 0
        self._unlogged = 0
        self._since_summary = 0.0
        self._first_failure = 0.0

    def verbose(self) -> bool:
        """Whether the output of the attempt under way is logged line by line."""
        return self.streak < LOG_FIRST

    def max_delay(self, usual: float) -> float:
        """The longest pause before the next attempt: ``usual`` at first, longer once
        the backend has been failing for a while (it is summarised by then anyway)."""
        if self.streak and time.monotonic() - self._first_failure >= LONG_FAILURE:
            return max(usual, LONG_FAILURE_DELAY)
        return usual

    def failed(self, reason: str, next_try: float, log_it: bool = True) -> None:
        now = time.monotonic()
        if self.streak == 0:
            self._first_failure = now
        self.streak += 1
        if self.streak <= LOG_FIRST:
            if log_it:
                log.warning("backend restart failed",
                            extra={"backend": self.backend, "reason": reason,
                                   "attempt": self.streak, "next_try_in": round(next_try, 1)})
            if self.streak == LOG_FIRST:
                log.warning("backend keeps failing to start; further failures are "
                            f"summarised every {SUMMARY_EVERY:.0f}s",
                            extra={"backend": self.backend, "reason": reason})
                self._since_summary = now
            return
        self._unlogged += 1
        if now - self._since_summary >= SUMMARY_EVERY:
            log.warning("backend still failing to restart",
                        extra={"backend": self.backend, "failures": self._unlogged,
                               "attempts": self.streak, "reason": reason,
                               "failing_for_s": round(now - self._first_failure),
                               "next_try_in": round(next_try, 1)})
            self._unlogged, self._since_summary = 0, now

    def recovered(self) -> None:
        if self.streak > LOG_FIRST:
            log.warning("backend started after failing", extra={
                "backend": self.backend, "attempts": self.streak,
                "failing_for_s": round(time.monotonic() - self._first_failure)})
        self.streak, self._unlogged = 0, 0

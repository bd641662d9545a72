"""Structured logging. Records carry fields in ``extra``; the JSON formatter emits them.

Nothing here ever receives PINs or key material: callers log call names, handles,
return values and identities only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time

from .textsafe import one_line

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One line per record: the message and every field have their control characters
    escaped (a newline in a certificate's CN must not start a forged record); a
    traceback follows on lines of its own, each indented, so that no line of it can
    pass for a record either."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(
            f"{one_line(k)}={one_line(str(v))}" for k, v in vars(record).items()
            if k not in _STD and not k.startswith("_")
        )
        base = f"{record.levelname.lower():7} {record.name}: {one_line(record.getMessage())}"
        line = f"{base} {extra}".rstrip()
        if record.exc_info:
            line += "".join("\n    " + one_line(t)
                            for t in self.formatException(record.exc_info).splitlines())
        return line


class ReopenableFileHandler(logging.FileHandler):
    """A log file that can be closed and opened again by name, so that logrotate can
    rename it and the next records go to a new file (on SIGHUP).

    Opened without blocking (then set blocking for the writes): open() of a FIFO for
    writing waits for a reader, and this runs on the event loop at a SIGHUP, so a log
    path replaced by a FIFO held every client until someone read it. Such a FIFO now
    fails the open (ENXIO: the old file is kept); a FIFO someone reads, a terminal or
    ``/dev/stderr`` stay usable as log files, as before."""

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(self.baseFilename, flags | os.O_CLOEXEC, 0o666)  # umask applies
        try:
            os.set_blocking(fd, True)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> None:
        self.acquire()
        try:
            new = self._open()  # before closing: a failed open keeps the old file
            old, self.stream = self.stream, new
            if old is not None:
                old.close()
        finally:
            self.release()


#: syslog priorities (sd-daemon(3) line prefixes) of the logging levels
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():  # highest level first
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """Each line starts with ``<N>``, the record's syslog priority, as journald reads a
    service's stderr (sd-daemon(3)): `journalctl -p warning` then finds the warnings.
    Every line of a record gets it, so a traceback's lines keep the record's priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM holds its
    device and inode): not when a process started from a journal-logged shell writes to
    a file or a terminal."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup(level: str = "info", fmt: str = "json", file: str | None = None) -> None:
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler: logging.Handler
    if file is None:
        if fmt == "journal" or stderr_is_journal():
            formatter = JournalFormatter(formatter)
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = ReopenableFileHandler(file, encoding="utf-8")
    handler.setFormatter(formatter)
    root = logging.getLogger("p11gate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # the event loop's own reports (asyncio's and uvloop's exception handler: "SSL
    # handshake failed", "Fatal error on transport" with a traceback) go through the
    # same handler: else Python's last-resort handler wrote them to stderr as raw
    # multi-line text, outside the log format and the log file
    loop_log = logging.getLogger("asyncio")
    loop_log.handlers[:] = [handler]
    loop_log.setLevel(logging.WARNING)
    loop_log.propagate = False


def reopen() -> list[str]:
    """Reopen every log file (SIGHUP); returns their paths (none when logging to stderr)."""
    out = []
    for h in logging.getLogger("p11gate").handlers:
        if isinstance(h, ReopenableFileHandler):
            try:
                h.reopen()
            except OSError as e:  # the old file stays in use, and is told why
                logging.getLogger("p11gate").error(
                    "SIGHUP: cannot reopen the log file; still writing to the old file",
                    extra={"path": h.baseFilename, "error": e.strerror})
                continue
            out.append(h.baseFilename)
    return out

"""Structured logging. Records carry fields in ``extra``; the JSON formatter emits them.

Nothing here ever receives PINs or key material: callers log call names, handles,
return values and identities only.
"""

from __future__ import annotations

import json
import logging
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


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("p11gate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

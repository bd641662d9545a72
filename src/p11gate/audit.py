"""The audit log: one JSON line per login, key use, object change and denial.

Records carry who (identity), where (token), what (operation, object identity,
mechanism) and the result — never a PIN, key material or data. The file is opened in
append mode and each record is written with one ``write`` call, so concurrent readers
(and log shippers) see whole lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from . import ck
from .codec import ckr

log = logging.getLogger("p11gate.audit")

_CLASS_NAMES = {ck.CKO_DATA: "data", ck.CKO_CERTIFICATE: "certificate",
                ck.CKO_PUBLIC_KEY: "public_key", ck.CKO_PRIVATE_KEY: "private_key",
                ck.CKO_SECRET_KEY: "secret_key"}


def object_fields(cls: int | None, cka_id: bytes | None, label: bytes | None) -> dict[str, Any]:
    """An object's identity as audit fields (CKA_ID in hex, label as text)."""
    out: dict[str, Any] = {}
    if cls is not None:
        out["class"] = _CLASS_NAMES.get(cls, f"{cls:#x}")
    if cka_id is not None:
        out["id"] = cka_id.hex()
    if label is not None:
        out["label"] = label.decode("utf-8", "replace")
    return out


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.records = 0

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, op: str, rv: int, identity: str, token: str | None = None,
               **fields: Any) -> None:
        if self._fd is None:
            return
        rec: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "identity": identity,
            "token": token,
            "op": op,
            "result": ckr.name(rv),
        }
        rec.update(fields)
        try:
            os.write(self._fd, json.dumps(rec, separators=(",", ":")).encode() + b"\n")
            self.records += 1
        except OSError as e:
            log.error("cannot write the audit log", extra={"path": self.path,
                                                           "error": e.strerror})

    def reopen(self) -> None:
        """Open the file again by name (SIGHUP: logrotate renamed it); the record count
        goes on. A failed open keeps writing to the old file and raises OSError."""
        if self._fd is None or self.path is None:
            return
        new = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        old, self._fd = self._fd, new
        os.close(old)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""The audit log: one JSON line per login, key use, object change and denial.

Records carry who (identity), where (token), what (operation, object identity,
mechanism) and the result — never a PIN, key material or data. The file is opened in
append mode and each record is written with one ``write`` call, so concurrent readers
(and log shippers) see whole lines.

Fail closed: with ``required`` (``[audit] required = true``, the default) a record that
cannot be written raises :class:`AuditError`, and the caller fails (and, where the
backend already acted, undoes) the audited operation; without it the failure is only
logged. Each failure is logged either way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from typing import Any

from .codec import ckr
from .codec import constants as ck
from .errors import Pkcs11Error

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


#: errnos that mean "no room": the client gets CKR_DEVICE_MEMORY, as for the registry
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class AuditError(Pkcs11Error):
    """An audit record that had to be written was not: the audited operation fails with
    CKR_DEVICE_MEMORY (disk full) or CKR_DEVICE_ERROR (any other write error)."""

    def __init__(self, rv: int, reason: str) -> None:
        super().__init__(rv, f"audit log: {reason}")
        self.reason = reason


class NotRegularFile(OSError):
    """The audit path names a FIFO, a device, a socket or a directory (perhaps through a
    symbolic link): not a file records can be appended to."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_audit_file(path: str) -> int:
    """The audit file opened for appending (made 0600 if missing), without ever waiting:
    opened non-blocking, so a FIFO in its place (or behind a symbolic link) cannot hold
    the event loop until some reader comes, then checked with fstat to be a regular
    file. Raises :class:`NotRegularFile` for anything else, OSError as ``open`` does."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads, a device with no unit
            raise
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise e from None
        if stat.S_ISREG(mode):
            raise
        raise NotRegularFile(errno.EINVAL, f"it is {_kind(mode)}, not a regular file",
                             path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"it is {_kind(mode)}, not a regular file",
                                 path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class AuditLog:
    def __init__(self, path: str | None, required: bool = True) -> None:
        self.path = path
        #: a record that cannot be written fails the operation (fail closed)
        self.required = required
        #: records that could not be written (status)
        self.failures = 0
        self._fd: int | None = None
        #: why records cannot be written at all (the path names no regular file after a
        #: reopen): every record fails, as on a full disk, until a reopen succeeds
        self.broken: str | None = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._fd = open_audit_file(path)
        self.records = 0

    @property
    def enabled(self) -> bool:
        return self._fd is not None or self.broken is not None

    def record(self, op: str, rv: int, identity: str, token: str | None = None,
               **fields: Any) -> None:
        """One record; raises AuditError when it cannot be written and audit is
        required."""
        self._write(op, ckr.name(rv), identity, token, fields)

    def _write(self, op: str, result: str, identity: str, token: str | None,
               fields: dict[str, Any]) -> None:
        if self._fd is None:
            if self.broken is not None:
                self._failed(op, None, self.broken)
            return
        rec: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "identity": identity,
            "token": token,
            "op": op,
            "result": result,
        }
        rec.update(fields)
        line = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
        try:
            n = os.write(self._fd, line)
        except OSError as e:
            self._failed(op, e.errno, e.strerror or str(e))
            return
        if n != len(line):
            # a short write (the disk filled up mid-record): cut the torn line off (this
            # process is the file's only writer), or at least end it so the next record
            # starts on its own line; either way this record counts as not written
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - n)
            except OSError:
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"\n")
            self._failed(op, errno.ENOSPC, f"short write ({n} of {len(line)} bytes)")
            return
        self.records += 1

    def _failed(self, op: str, err: int | None, reason: str) -> None:
        self.failures += 1
        log.error("cannot write the audit log", extra={
            "path": self.path, "error": reason, "op": op,
            "action": "operation refused" if self.required else "operation goes on"})
        if self.required:
            raise AuditError(ckr.DEVICE_MEMORY if err in _NO_ROOM else ckr.DEVICE_ERROR,
                             reason)

    def attempt(self, op: str, identity: str, token: str | None = None,
                **fields: Any) -> None:
        """Before an operation that cannot be undone (destroying an object, changing a
        PIN): a record with result ``PENDING``; raises AuditError (required audit) so
        that nothing is done that the log does not show. The result follows as a
        best-effort record."""
        self._write(op, "PENDING", identity, token, fields)

    def record_best_effort(self, op: str, rv: int, identity: str, token: str | None = None,
                           **fields: Any) -> None:
        """A record of something that failed anyway (a refusal, an error result, an
        undone action): written if possible, logged if not, never raises — the client
        already gets an error."""
        try:
            self.record(op, rv, identity, token, **fields)
        except AuditError:
            pass

    def reopen(self) -> None:
        """Open the file again by name (SIGHUP: logrotate renamed it); the record count
        goes on. A failed open keeps writing to the old file and raises OSError, except
        when the path names no regular file (a FIFO, a device, perhaps through a
        symbolic link): then no record can be written (each fails as on a full disk:
        audited calls are refused with required audit) until a reopen finds a regular
        file, and NotRegularFile is raised. Records written to the old file would go
        where no one who reads the configured path looks."""
        if not self.enabled or self.path is None:
            return
        try:
            new = open_audit_file(self.path)
        except NotRegularFile as e:
            self.close()
            self.broken = f"{self.path}: {e.strerror}"
            raise
        old, self._fd = self._fd, new
        self.broken = None
        if old is not None:
            os.close(old)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""The audit file is opened without blocking and must be a regular file (audit.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p11gate.audit import AuditError, AuditLog, NotRegularFile, open_audit_file
from p11gate.codec import ckr


def test_a_fifo_with_a_reader_is_refused_too(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # now a writer's open succeeds
    try:
        with pytest.raises(NotRegularFile, match="a FIFO"):
            open_audit_file(str(fifo))
    finally:
        os.close(reader)
    with pytest.raises(NotRegularFile, match="a FIFO"):  # and without one: no wait
        open_audit_file(str(fifo))


def test_directories_devices_and_links_to_them_are_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/dev/null")
    with pytest.raises(NotRegularFile, match="a character device"):
        open_audit_file(str(tmp_path / "link"))
    with pytest.raises(IsADirectoryError):  # open() itself refuses it
        open_audit_file(str(tmp_path))


def test_a_regular_file_is_opened_blocking_and_private(tmp_path: Path) -> None:
    fd = open_audit_file(str(tmp_path / "audit.jsonl"))
    try:
        assert os.get_blocking(fd)
        assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


@pytest.mark.parametrize("required", [True, False])
def test_reopen_onto_a_fifo_fails_every_record_until_a_regular_file_is_back(
        tmp_path: Path, required: bool) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), required)
    audit.record("C_Login", ckr.OK, "uid:1")
    path.rename(tmp_path / "audit.jsonl.1")
    os.mkfifo(path)
    with pytest.raises(NotRegularFile):
        audit.reopen()
    assert audit.enabled and audit.broken is not None
    if required:
        with pytest.raises(AuditError) as e:
            audit.record("C_SignInit", ckr.OK, "uid:1")
        assert e.value.rv == ckr.DEVICE_ERROR and "not a regular file" in e.value.reason
    else:
        audit.record("C_SignInit", ckr.OK, "uid:1")  # logged, not raised
    assert audit.failures == 1
    path.unlink()
    audit.reopen()
    assert audit.broken is None
    audit.record("C_SignInit", ckr.OK, "uid:1")
    assert '"op":"C_SignInit"' in path.read_text()
    assert audit.records == 2
    audit.close()


def test_the_log_file_replaced_by_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    """logs.ReopenableFileHandler: a SIGHUP's reopen of a log path that became a FIFO
    nobody reads fails at once (ENXIO) and keeps the old file; open() used to wait."""
    import logging

    from p11gate.logs import ReopenableFileHandler

    path = tmp_path / "p11gate.log"
    h = ReopenableFileHandler(str(path), encoding="utf-8")
    try:
        path.rename(tmp_path / "p11gate.log.1")
        os.mkfifo(path)
        with pytest.raises(OSError):
            h.reopen()
        h.emit(logging.makeLogRecord({"msg": "still here"}))
        h.flush()
        assert "still here" in (tmp_path / "p11gate.log.1").read_text()
        path.unlink()
        h.reopen()
        h.emit(logging.makeLogRecord({"msg": "new file"}))
        h.flush()
        assert "new file" in path.read_text()
    finally:
        h.close()

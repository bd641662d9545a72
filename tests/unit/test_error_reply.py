"""Issue 11: one function turns an exception into a reply. Before, the async path, the
hot path's done-callback and the raw relay each had their own ``except`` ladder, and they
disagreed: a CodecError that is not an ArgumentError (a reply the gateway cannot carry)
was CKR_DEVICE_ERROR on the async path but CKR_GENERAL_ERROR on the other two, and a
TimeoutError was CKR_GENERAL_ERROR on the async path. Now every path answers through
``frontend/replies.py``; this checks its answers and that no other frontend module builds
an error reply from an exception itself."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from p11gate.codec import ArgumentError, CodecError, ProtocolError, ckr, reply_rv
from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.errors import BackendUnavailable, Pkcs11Error
from p11gate.frontend import replies
from p11gate.identity import Identity
from p11gate.policy import Denied

FRONTEND = Path(replies.__file__).parent
SIGN = CALLS_BY_NAME["C_Sign"]


class _Conn:
    id = 7
    peer = "uid=1000 gid=1000 pid=4242"
    identity = Identity(kind="unix", uid=1000, gid=1000, pid=4242)

    def __init__(self) -> None:
        self.denied: list[Denied] = []

    def _denied(self, call: Any, e: Denied) -> None:
        self.denied.append(e)


@pytest.mark.parametrize(("exc", "rv"), [
    (Pkcs11Error(ckr.KEY_HANDLE_INVALID), ckr.KEY_HANDLE_INVALID),
    (BackendUnavailable("worker died"), ckr.DEVICE_ERROR),
    (TimeoutError(), ckr.DEVICE_ERROR),
    (ArgumentError(ckr.MECHANISM_INVALID, "not carried"), ckr.MECHANISM_INVALID),
    (ProtocolError("truncated: u64"), ckr.DEVICE_ERROR),
    (CodecError("cannot encode"), ckr.DEVICE_ERROR),
    (Denied(ckr.USER_NOT_LOGGED_IN, "r1", "key use", "t"), ckr.USER_NOT_LOGGED_IN),
    (KeyError("bug"), ckr.GENERAL_ERROR),
])
def test_each_failure_has_one_answer(exc: BaseException, rv: int) -> None:
    conn = _Conn()
    body = replies.error_reply(conn, SIGN, exc)  # type: ignore[arg-type]
    assert reply_rv(body) == rv
    assert conn.denied == ([exc] if isinstance(exc, Denied) else [])


def test_codec_error_is_logged_without_arguments(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "p11gate.conn")
    replies.error_reply(_Conn(), SIGN, CodecError("value of 3 bytes"))  # type: ignore[arg-type]
    replies.error_reply(_Conn(), SIGN, Pkcs11Error(ckr.PIN_INCORRECT))  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == ["cannot carry the reply"]
    replies.error_reply(_Conn(), SIGN, RuntimeError("x"))  # type: ignore[arg-type]
    assert caplog.records[-1].exc_info is not None  # the gateway's own fault: its trace


def test_no_other_frontend_module_maps_exceptions_itself() -> None:
    """The former copies caught an exception and built an ERROR reply on the spot."""
    offenders = []
    for path in sorted(FRONTEND.glob("*.py")):
        if path.name == "replies.py":
            continue
        text = path.read_text()
        if re.search(r"except[^\n]*:\n\s+(\w+\s*=\s*)?encode_error\(", text):
            offenders.append(path.name)
        if "encode_error(ckr.GENERAL_ERROR)" in text:
            offenders.append(path.name)
    assert offenders == []

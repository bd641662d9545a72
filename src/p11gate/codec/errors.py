"""Codec errors.

Two kinds, because the protocol answers them differently (SPEC §6.3):
a *framing* error means the byte stream can no longer be trusted and the connection must be
closed; an *argument* error is a complete frame whose content is unacceptable and gets an
ERROR reply carrying a CK_RV.
"""

from __future__ import annotations


class CodecError(Exception):
    """Base class for everything the codec rejects."""


class ProtocolError(CodecError):
    """Malformed or truncated message: close the connection, do not reply."""


class ArgumentError(CodecError):
    """Well-framed but invalid argument: reply with ERROR(rv)."""

    def __init__(self, rv: int, message: str) -> None:
        super().__init__(message)
        self.rv = rv

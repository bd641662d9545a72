"""The p11-kit RPC codec: pure functions from bytes to Python values and back.

No I/O happens here; the frontend, the worker and the RPC client backend all use it.
"""

from .calls import CALLS, CALLS_BY_NAME, HANDSHAKE, Call
from .errors import ArgumentError, CodecError, ProtocolError
from .framing import Frame, FrameReader, build_frame
from .message import (
    ReplyError,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    reply_rv,
)
from .tables import MAX_VERSION, V0241, V025, V026, Dialect, dialect_for_version
from .values import (
    Attribute,
    AttrRequest,
    Mechanism,
    Null,
    ParamUpdate,
    Version,
)

__all__ = [
    "CALLS",
    "CALLS_BY_NAME",
    "HANDSHAKE",
    "MAX_VERSION",
    "V0241",
    "V025",
    "V026",
    "ArgumentError",
    "AttrRequest",
    "Attribute",
    "Call",
    "CodecError",
    "Dialect",
    "Frame",
    "FrameReader",
    "Mechanism",
    "Null",
    "ParamUpdate",
    "ProtocolError",
    "ReplyError",
    "Version",
    "build_frame",
    "decode_reply",
    "decode_request",
    "dialect_for_version",
    "encode_error",
    "encode_reply",
    "encode_request",
    "reply_rv",
]

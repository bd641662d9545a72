"""Chains: several requests carried in one frame between the gateway and its own
`p11gate worker`, run one after the other on one worker thread, their replies carried
back in one frame.

Why: each round trip to a worker process costs two process wake-ups, which on a
virtual machine are most of a cheap call's cost. A search is three calls the gateway
knows in advance (C_FindObjectsInit, then C_FindObjects at once; a pool's member
search ends with C_FindObjectsFinal too), so they can travel as one.

This is not part of the p11-kit protocol: a chain frame is marked by its options
(:data:`CHAIN_OPTIONS`), which clients never reach (the frontend reads requests from
clients only by their body, and a worker's input comes only from the gateway). It is
sent only to workers that announce that they run chains (``p11gate worker``, never
``p11-kit remote``).

Body layout (big-endian): ``u32 count``, then per request ``u32 length`` and the
request body, encoded as any request. The reply has the same layout with one reply
body per request run; the worker stops after the first reply that is not CKR_OK (an
ERROR reply), so a reply may carry fewer bodies than requests were sent.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

CHAIN_OPTIONS = b"p11gate-chain"
#: the most requests in one chain (a search needs three)
MAX_CHAIN = 4

_U32 = struct.Struct(">I")


def encode_chain(bodies: list[bytes]) -> bytes:
    if not 0 < len(bodies) <= MAX_CHAIN:
        raise ValueError(f"a chain holds 1 to {MAX_CHAIN} bodies, not {len(bodies)}")
    parts = [_U32.pack(len(bodies))]
    for body in bodies:
        parts.append(_U32.pack(len(body)))
        parts.append(body)
    return b"".join(parts)


def decode_chain(body: bytes) -> list[bytes]:
    """The bodies of a chain frame; ProtocolError when it is not one (a broken frame
    from the gateway: the worker closes the stream, as for any malformed frame)."""
    if len(body) < 4:
        raise ProtocolError("chain frame too short")
    (count,) = _U32.unpack_from(body, 0)
    if not 0 < count <= MAX_CHAIN:
        raise ProtocolError(f"chain of {count} requests")
    out: list[bytes] = []
    at = 4
    for _ in range(count):
        if at + 4 > len(body):
            raise ProtocolError("chain frame truncated")
        (n,) = _U32.unpack_from(body, at)
        at += 4
        if at + n > len(body):
            raise ProtocolError("chain frame truncated")
        out.append(body[at:at + n])
        at += n
    if at != len(body):
        raise ProtocolError("bytes after the last request of a chain")
    return out

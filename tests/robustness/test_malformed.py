"""Malformed input gets an error or a closed connection for that client only, never a
crash, a hang or another client affected."""

from __future__ import annotations

import struct

import pytest
from tests.gateway_proc import Gateway, RawClient

from p11gate.codec import HANDSHAKE, Attribute, AttrRequest, Mechanism, ReplyError, ckr

C_GetSlotList, C_OpenSession, C_Login, C_FindObjectsInit, C_FindObjects = 4, 10, 18, 26, 27
C_FindObjectsFinal, C_SignInit, C_Sign, C_GenerateRandom = 28, 42, 43, 64
C_GetAttributeValue, C_CreateObject, C_CloseSession = 24, 20, 11


def good_client(gw: Gateway, timeout: float = 10.0) -> tuple[RawClient, int, int]:
    """An initialized, logged-in client with a session and the EC key's handle."""
    c = RawClient(gw.path, timeout=timeout)
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 8])
    (sess,) = c.call(C_OpenSession, [slots[0], 6])
    try:
        c.call(C_Login, [sess, 1, b"1234"])
    except ReplyError as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    c.call(C_FindObjectsInit, [sess, [Attribute(0, 3, 8), Attribute(0x102, b"\x01", 1)]])
    (found,) = c.call(C_FindObjects, [sess, 4])
    c.call(C_FindObjectsFinal, [sess])
    assert len(found) == 1
    return c, sess, found[0]


def sign_once(c: RawClient, sess: int, key: int) -> bytes:
    c.call(C_SignInit, [sess, Mechanism(0x1041, None), key])
    (sig,) = c.call(C_Sign, [sess, b"\x07" * 32, 64])
    assert isinstance(sig, bytes) and len(sig) == 64
    return sig


def header(code: int, olen: int, blen: int) -> bytes:
    return struct.pack(">III", code, olen, blen)


def body(call_id: int, sig: bytes, rest: bytes = b"") -> bytes:
    return struct.pack(">II", call_id, len(sig)) + sig + rest


BAD_STREAMS = {
    "huge body length": header(0x10, 0, 0xFFFFFFFF),
    "huge options length": header(0x10, 0xFFFFFFF0, 4),
    "call code 0": header(0, 0, 4) + b"\0\0\0\3",
    "unknown call id": header(0x10, 0, 8) + body(200, b""),
    "call id 0 in a request": header(0x10, 0, 9) + body(0, b"u"),
    "wrong signature": header(0x10, 0, 13) + body(64, b"uu", b"\0" * 3),
    "missing signature": header(0x10, 0, 8) + struct.pack(">II", 64, 0xFFFFFFFF),
    "truncated arguments": header(0x10, 0, 13) + body(64, b"ufy", b"\0" * 2),
    "byte array too long": header(0x10, 0, 24)
    + body(63, b"uay", b"\0" * 8 + b"\x01" + struct.pack(">I", 0x7FFFFFFF)),
    "attribute count huge": header(0x10, 0, 23)
    + body(26, b"uaA", b"\0" * 8 + struct.pack(">I", 0xFFFFFFFF)),
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_bad_frames_close_only_that_connection(gateway: Gateway, name: str) -> None:
    good, sess, key = good_client(gateway)
    bad = RawClient(gateway.path)
    bad.initialize()
    bad.send_raw(BAD_STREAMS[name])
    assert bad.closed_by_peer(), f"{name}: connection not closed"
    bad.close()
    sign_once(good, sess, key)  # the other client is unaffected
    good.close()
    assert gateway.alive()


def test_truncated_frame_then_eof(gateway: Gateway) -> None:
    bad = RawClient(gateway.path)
    bad.initialize()
    bad.send_raw(header(0x11, 0, 100) + b"\0" * 10)
    bad.close()
    good, sess, key = good_client(gateway)
    sign_once(good, sess, key)
    good.close()


def test_semantic_errors_get_error_replies(gateway: Gateway) -> None:
    c, sess, key = good_client(gateway)
    # a fixed-size string of the wrong length (C_InitToken2's label must be 32 bytes):
    # an ERROR reply, and the connection stays usable
    args = struct.pack(">Q", 1) + b"\x01" + struct.pack(">I", 4) + b"1234"
    args += struct.pack(">I", 5) + b"short"
    c.code += 1
    b = body(88, b"uays", args)
    c.send_raw(header(c.code, 0, len(b)) + b)
    frame = c.recv_frame()
    assert frame is not None and frame[0] == c.code
    assert frame[1] == body(0, b"u", struct.pack(">Q", ckr.DEVICE_ERROR))
    # nested templates deeper than the codec allows: ERROR reply, connection stays open
    inner: list[Attribute] = [Attribute(0, 4, 8)]
    for _ in range(12):
        inner = [Attribute(0x40000211, inner, 24)]
    with pytest.raises(ReplyError) as e:
        c.call(C_CreateObject, [sess, inner])
    assert e.value.rv == ckr.DEVICE_ERROR
    sign_once(c, sess, key)
    # an empty body (not even a call id): the connection is closed
    c.code += 1
    c.send_raw(header(c.code, 0, 0))
    assert c.closed_by_peer()
    c.close()


def test_absurd_capacity_is_clamped(gateway: Gateway) -> None:
    c, sess, key = good_client(gateway)
    # C_Sign with a 2 GiB output buffer: the gateway must not ask the backend for it
    c.call(C_SignInit, [sess, Mechanism(0x1041, None), key])
    (sig,) = c.call(C_Sign, [sess, b"\x01" * 32, 0x7FFFFFF0])
    assert isinstance(sig, bytes) and len(sig) == 64
    # attribute buffers adding up to more than max_buffer: CKR_HOST_MEMORY
    reqs = [AttrRequest(3, 0x7FFFFFF0), AttrRequest(0x102, 0x7FFFFFF0)]
    with pytest.raises(ReplyError) as e:
        c.call(C_GetAttributeValue, [sess, key, reqs])
    assert e.value.rv == ckr.HOST_MEMORY
    sign_once(c, sess, key)
    c.close()


def test_handles_of_another_connection_are_invalid(gateway: Gateway) -> None:
    a, sess_a, key_a = good_client(gateway)
    b = RawClient(gateway.path)
    b.initialize()
    (slots,) = b.call(C_GetSlotList, [1, 8])
    # b has no sessions: a's session handle means nothing on b's connection
    with pytest.raises(ReplyError) as e:
        b.call(C_GenerateRandom, [sess_a, 16])
    assert e.value.rv == ckr.SESSION_HANDLE_INVALID
    (sess_b,) = b.call(C_OpenSession, [slots[0], 6])
    # a's key handle on b's connection: b never obtained it
    for guess in (key_a, key_a + 1, 0, 0xFFFFFFFF, 1 << 63):
        if guess == 0:
            continue
        with pytest.raises(ReplyError) as e:
            b.call(C_SignInit, [sess_b, Mechanism(0x1041, None), guess])
        assert e.value.rv in (ckr.OBJECT_HANDLE_INVALID, ckr.KEY_HANDLE_INVALID)
    sign_once(a, sess_a, key_a)
    a.close()
    b.close()


def test_calls_before_initialize_and_bad_handshake(gateway: Gateway) -> None:
    c = RawClient(gateway.path)
    with pytest.raises(ReplyError) as e:
        c.call(C_GetSlotList, [1, 8])
    assert e.value.rv == ckr.CRYPTOKI_NOT_INITIALIZED
    with pytest.raises(ReplyError) as e:
        c.call(1, [b"not the handshake", 0, b"\0"])
    assert e.value.rv == ckr.GENERAL_ERROR
    c.call(1, [HANDSHAKE, 0, b"\0"])
    (slots,) = c.call(C_GetSlotList, [1, 8])
    assert len(slots) == 1
    c.close()


def test_a_client_cannot_send_a_chain(gateway: Gateway) -> None:
    """Chains (codec/chains.py: several requests in one frame, marked by the frame's
    options) run only between the gateway and its own worker. A client's frame with the
    chain options is read like any other frame (the options are never looked at): here
    its body is no request, so the connection is closed, and the chain's calls never
    reach the worker (the other client's session, on the same worker, goes on)."""
    from p11gate.codec import encode_request
    from p11gate.codec.chains import CHAIN_OPTIONS, encode_chain
    from p11gate.codec.tables import V0241

    good, sess, key = good_client(gateway)
    bad, bsess, _ = good_client(gateway)
    chain = encode_chain([encode_request(C_FindObjectsInit, [bsess, []], V0241),
                          encode_request(C_FindObjects, [bsess, 8], V0241)])
    bad.code += 1
    bad.send_raw(header(bad.code, len(CHAIN_OPTIONS), len(chain)) + CHAIN_OPTIONS + chain)
    assert bad.closed_by_peer()
    bad.close()
    sign_once(good, sess, key)  # same worker, same session: nothing restarted
    good.close()
    assert gateway.alive()

"""Hostile bytes into the decoder: only ProtocolError or ArgumentError, quickly, without
allocating what a length field claims."""

from __future__ import annotations

import random
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_capture_vectors import CAPTURES

from p11gate.codec import (
    V0241,
    V025,
    V026,
    ArgumentError,
    FrameReader,
    ProtocolError,
    ReplyError,
    decode_reply,
    decode_request,
)

DIALECTS = (V0241, V025, V026)
OK_ERRORS = (ProtocolError, ArgumentError)


def bodies() -> list[bytes]:
    out = []
    for path in sorted(CAPTURES.glob("*.hex")):
        for line in path.read_text().splitlines():
            if line[:4] in ("C>S ", "S>C ") and len(line) > 8:
                frame = bytes.fromhex(line[4:])
                olen = struct.unpack_from(">I", frame, 4)[0]
                out.append(frame[12 + olen:])
    assert out
    return out


def mutate(rng: random.Random, b: bytes) -> bytes:
    x = bytearray(b)
    for _ in range(rng.randint(1, 5)):
        k = rng.randrange(4)
        if k == 0 and x:
            x[rng.randrange(len(x))] ^= 1 << rng.randrange(8)
        elif k == 1 and x:
            del x[rng.randrange(len(x)):]
        elif k == 2 and len(x) >= 4:
            i = rng.randrange(len(x) - 3)
            x[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                     b"\x00\xff\xff\xff", b"\x00\x00\x10\x00"])
        else:
            x += rng.randbytes(rng.randrange(1, 32))
    return bytes(x)


def decode_all(body: bytes) -> None:
    for d in DIALECTS:
        try:
            decode_request(body, d)
        except OK_ERRORS:
            pass
        for call_id in (4, 24, 43, 59, 89):
            try:
                decode_reply(body, d, call_id)
            except (*OK_ERRORS, ReplyError):
                pass


def test_mutated_capture_bodies() -> None:
    rng = random.Random(1122)
    corpus = bodies()
    start = time.monotonic()
    worst = 0.0
    for _ in range(6000):
        b = mutate(rng, rng.choice(corpus))
        t = time.monotonic()
        decode_all(b)
        worst = max(worst, time.monotonic() - t)
    assert worst < 0.5, f"one input took {worst:.2f}s"
    assert time.monotonic() - start < 30


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bodies(body: bytes) -> None:
    decode_all(body)


def test_deep_nesting_is_bounded() -> None:
    # C_CreateObject with CKA_WRAP_TEMPLATE nested 10 000 levels deep
    inner = b""
    nested = struct.pack(">I", 1)
    for _ in range(10000):
        inner += struct.pack(">I", 0x40000211) + b"\x01" + struct.pack(">I", 24)
        inner += struct.pack(">I", 1)
    body = struct.pack(">II", 20, 3) + b"uaA" + struct.pack(">Q", 1) + nested + inner
    for d in DIALECTS:
        try:
            decode_request(body, d)
            raise AssertionError("accepted a 10000-deep template")
        except OK_ERRORS:
            pass


def test_frame_reader_refuses_huge_lengths_before_buffering() -> None:
    r = FrameReader(max_frame=1 << 20)
    try:
        list(r.feed(struct.pack(">III", 0x10, 0, 0xFFFFFFFF) + b"x" * 10))
        raise AssertionError("accepted a 4 GiB frame")
    except ProtocolError:
        pass
    r = FrameReader()
    assert list(r.feed(struct.pack(">III", 0x10, 0, 100))) == []
    assert r.pending() == 12  # waits for the body, holds only what arrived

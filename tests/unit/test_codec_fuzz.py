"""Hostile input: random bytes and mutated capture frames into decode_request,
decode_reply and FrameReader raise only ProtocolError / ArgumentError (ReplyError for a
well-formed ERROR reply), in bounded time, without allocating what a length claims and
without unbounded recursion."""

from __future__ import annotations

import random
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_codec_captures import CAPTURES, FILES

from p11gate.codec import (
    CALLS,
    V0241,
    V025,
    V026,
    ArgumentError,
    AttrRequest,
    FrameReader,
    Mechanism,
    ProtocolError,
    ReplyError,
    decode_reply,
    decode_request,
)

DIALECTS = (V0241, V025, V026)
OK = (ProtocolError, ArgumentError)
#: request context for replies that need it
REQUEST_ARGS = {
    24: [0x11, 3, [AttrRequest(0x40000600, 0), AttrRequest(0x3, 0), AttrRequest(0x11, 64),
                   AttrRequest(0x40000211, 48)]],
    89: [0x11, Mechanism(0x1050, None), 3, []],
}
SLOW = 0.25  # seconds for one input through every decoder


def corpus() -> list[bytes]:
    assert FILES, f"captures missing under {CAPTURES}"
    out = []
    for path in FILES:
        for line in path.read_text().splitlines():
            if line[:4] in ("C>S ", "S>C ") and len(line) > 8:
                out.append(bytes.fromhex(line[4:].strip()))
    return out


FRAMES = corpus()


def body(frame: bytes) -> bytes:
    olen = struct.unpack_from(">I", frame, 4)[0]
    return frame[12 + olen:]


BODIES = [body(f) for f in FRAMES]


def decode_everything(b: bytes) -> None:
    """Every decoder over ``b``; anything but the allowed errors propagates."""
    for d in DIALECTS:
        try:
            decode_request(b, d)
        except OK:
            pass
        reply_ids = {1, 3, 4, 6, 24, 43, 59, 81, 89}
        if len(b) >= 4:
            reply_ids.add(int.from_bytes(b[:4], "big") % len(CALLS) or 1)
        for cid in reply_ids:
            for args in (REQUEST_ARGS.get(cid), None):
                try:
                    decode_reply(b, d, cid, args)
                except (*OK, ReplyError):
                    pass


def feed_frames(stream: bytes, rng: random.Random | None = None) -> None:
    reader = FrameReader(max_frame=1 << 20)
    try:
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 64) if rng else len(stream)
            for f in reader.feed(stream[pos:pos + n]):
                decode_everything(f.body)
            pos += n
        assert reader.pending() <= len(stream)
    except ProtocolError:
        pass


HOSTILE_WORDS = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x7f\xff\xff\xfe",
                 b"\x80\x00\x00\x00", b"\x00\x01\x00\x00", b"\x00\x00\xff\xff",
                 b"\x00\x00\x00\x00", b"\x00\x00\x00\x01"]


def mutate(rng: random.Random, b: bytes) -> bytes:
    x = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(7)
        if k == 0 and x:  # bit flip
            x[rng.randrange(len(x))] ^= 1 << rng.randrange(8)
        elif k == 1 and x:  # truncation
            del x[rng.randrange(len(x)):]
        elif k == 2 and len(x) >= 4:  # a hostile length / count word
            i = rng.randrange(len(x) - 3)
            x[i:i + 4] = rng.choice(HOSTILE_WORDS)
        elif k == 3 and x:  # random byte
            x[rng.randrange(len(x))] = rng.randrange(256)
        elif k == 4 and x:  # delete a slice
            i = rng.randrange(len(x))
            del x[i:i + rng.randint(1, 8)]
        elif k == 5 and x:  # duplicate a slice
            i = rng.randrange(len(x))
            x[i:i] = x[i:i + rng.randint(1, 16)]
        else:  # junk at the end
            x += rng.randbytes(rng.randint(1, 16))
    return bytes(x)


def timed(b: bytes) -> float:
    t = time.perf_counter()
    decode_everything(b)
    return time.perf_counter() - t


# ------------------------------------------------------------------ fixed-seed loops


def test_unmodified_capture_bodies() -> None:
    for b in BODIES:
        assert timed(b) < SLOW


def test_mutated_capture_bodies() -> None:
    rng = random.Random(0x11F)
    start = time.monotonic()
    worst = 0.0
    for _ in range(10000):
        worst = max(worst, timed(mutate(rng, rng.choice(BODIES))))
    assert worst < SLOW, f"one input took {worst:.3f}s"
    assert time.monotonic() - start < 10


def test_hostile_words_at_every_offset() -> None:
    """0xffffffff / 0x7fffffff / huge counts at each 4-byte position of a few rich bodies
    (attribute arrays, mechanisms, ulong arrays, signatures)."""
    rich = [b for b in BODIES if any(s in b for s in (b"uaA", b"aAu", b"uMu", b"au", b"uPu"))]
    worst = 0.0
    for b in rich[:12]:
        for i in range(8, len(b) - 3):
            for w in (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x10\x00\x00"):
                worst = max(worst, timed(b[:i] + w + b[i + 4:]))
    assert worst < SLOW


def test_mutated_streams_through_frame_reader() -> None:
    rng = random.Random(0xF4A)
    for _ in range(300):
        frames = [rng.choice(FRAMES) for _ in range(rng.randint(1, 4))]
        stream = mutate(rng, b"".join(frames))
        feed_frames(stream, rng)


def test_random_bytes_fixed_seed() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        b = rng.randbytes(rng.randint(0, 80))
        if rng.random() < 0.5 and len(b) >= 8:
            # plausible head: a real call id and its signature, then random arguments
            call = rng.choice(CALLS[1:])
            sig = rng.choice([call.req_sig, call.rep_sig])
            b = struct.pack(">II", call.id, len(sig)) + sig + b
        decode_everything(b)


# ------------------------------------------------------------------ hypothesis


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=160))
def test_random_bodies(b: bytes) -> None:
    decode_everything(b)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(BODIES))), st.randoms(use_true_random=False))
def test_mutated_bodies_hypothesis(i: int, rng: random.Random) -> None:
    decode_everything(mutate(rng, BODIES[i]))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.randoms(use_true_random=False))
def test_random_streams(stream: bytes, rng: random.Random) -> None:
    feed_frames(stream, rng)


# ------------------------------------------------------------------ specific hazards


@pytest.mark.parametrize("d", DIALECTS, ids=[d.name for d in DIALECTS])
def test_deep_template_nesting_is_bounded(d: object) -> None:
    # C_CreateObject with CKA_WRAP_TEMPLATE nested 20 000 levels deep: no RecursionError
    level = struct.pack(">I", 0x40000211) + b"\x01" + struct.pack(">II", 24, 1)
    body = (struct.pack(">II", 20, 3) + b"uaA" + struct.pack(">QI", 0x11, 1)
            + level * 20000 + struct.pack(">I", 0x3) + b"\x00")
    with pytest.raises(OK):
        decode_request(body, d)  # type: ignore[arg-type]
    # the same depth in a nested fA request
    level = struct.pack(">III", 0x40000211, 24, 1)
    body = (struct.pack(">II", 24, 4) + b"uufA" + struct.pack(">QQI", 0x11, 3, 1)
            + level * 20000 + struct.pack(">II", 3, 0))
    try:
        decode_request(body, d)  # type: ignore[arg-type]
    except OK:
        pass


def test_huge_counts_do_not_allocate() -> None:
    head = struct.pack(">II", 4, 2) + b"au"
    for count in (0x7FFFFFFF, 0xFFFFFFFE, 0x10000000):
        with pytest.raises(ProtocolError):
            decode_reply(head + b"\x01" + struct.pack(">I", count) + b"\x00" * 16, V026, 4)
    head = struct.pack(">II", 20, 3) + b"uaA" + struct.pack(">Q", 0x11)
    for count in (0x7FFFFFFF, 0xFFFFFFFF, 0x00100000):
        with pytest.raises(ProtocolError):
            decode_request(head + struct.pack(">I", count) + b"\x00" * 16, V026)
    # a mechanism array claiming 2^31 elements inside an attribute
    attr = struct.pack(">I", 0x40000600) + b"\x01" + struct.pack(">II", 16, 0x7FFFFFFF)
    with pytest.raises(ProtocolError):
        decode_request(head + struct.pack(">I", 1) + attr, V026)
    # byte arrays of 0x7fffffff and more are invalid
    sig = struct.pack(">II", 43, 5) + b"uayfy" + struct.pack(">Q", 0x11) + b"\x01"
    for n in (0x7FFFFFFF, 0xFFFFFFFE):
        with pytest.raises(ProtocolError):
            decode_request(sig + struct.pack(">I", n) + b"x" * 8, V0241)


def test_frame_reader_refuses_huge_lengths_before_buffering() -> None:
    for olen, blen in ((0, 0xFFFFFFFF), (0xFFFFFFFF, 0), (0, 0x7FFFFFFF), (0x10000, 10)):
        r = FrameReader(max_frame=1 << 20)
        with pytest.raises(ProtocolError):
            list(r.feed(struct.pack(">III", 0x10, olen, blen) + b"x" * 10))
    r = FrameReader()
    assert list(r.feed(struct.pack(">III", 0x10, 0, 100))) == []
    assert r.pending() == 12  # waits for the body, holds only what arrived
    with pytest.raises(ProtocolError):
        list(FrameReader().feed(struct.pack(">III", 0, 0, 0)))  # call code 0

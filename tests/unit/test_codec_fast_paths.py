"""The codec's fast paths give exactly what the general paths give.

Messages made only of fixed-width numbers are decoded and encoded with one struct, and a
chunk fed to an empty FrameReader is sliced without copying; each is checked here against
the general path (the fast path switched off), byte for byte and value for value, and on
the malformed inputs where the general path raises."""

from __future__ import annotations

import random

import pytest

from p11gate.codec import (
    CALLS,
    V025,
    V026,
    FrameReader,
    ProtocolError,
    build_frame,
    decode_request,
    encode_reply,
    encode_request,
    message,
)

ID = {c.name: c.id for c in CALLS}
C_CloseSession, C_GenerateRandom = ID["C_CloseSession"], ID["C_GenerateRandom"]
FIXED_REQUESTS = [c for c in CALLS if message._FIXED_REQ[c.id] is not None]
FIXED_REPLIES = [c for c in CALLS if message._FIXED_REP[c.id] is not None]
LIMIT = {"y": 0xFF, "u": 0xFFFFFFFFFFFFFFFF, "fy": 0xFFFFFFFF, "fu": 0xFFFFFFFF}


@pytest.fixture
def general(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the fixed-width fast paths off."""
    monkeypatch.setattr(message, "_FIXED_REQ", [None] * len(CALLS))
    monkeypatch.setattr(message, "_FIXED_REP", [None] * len(CALLS))


def values(codes: tuple[str, ...], rng: random.Random) -> list[int]:
    return [rng.choice([0, 1, LIMIT[c], rng.randint(0, LIMIT[c])]) for c in codes]


def test_the_common_calls_have_fast_paths() -> None:
    names = {c.name for c in FIXED_REQUESTS}
    assert {"C_GenerateRandom", "C_CloseSession", "C_FindObjectsFinal", "C_SignFinal"} <= names
    assert "C_OpenSession" in {c.name for c in FIXED_REPLIES}


def test_fixed_messages_are_the_bytes_and_values_of_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(11)
    cases = []
    for d in (V025, V026):
        for call in FIXED_REQUESTS:
            for _ in range(20):
                args = values(call.req_codes, rng)
                body = encode_request(call.id, args, d)
                got = decode_request(body + b"trailing", d)
                cases.append(("req", call.id, args, d, body, got))
        for call in FIXED_REPLIES:
            for _ in range(20):
                vals = values(call.rep_codes, rng)
                cases.append(("rep", call.id, vals, d, encode_reply(call.id, vals, d), None))
    monkeypatch.setattr(message, "_FIXED_REQ", [None] * len(CALLS))
    monkeypatch.setattr(message, "_FIXED_REP", [None] * len(CALLS))
    for kind, cid, vals, d, fast_body, fast_decoded in cases:
        if kind == "req":
            assert encode_request(cid, vals, d) == fast_body
            assert decode_request(fast_body + b"trailing", d) == fast_decoded
            assert fast_decoded == (CALLS[cid], vals)
        else:
            assert encode_reply(cid, vals, d) == fast_body


def test_values_outside_the_struct_take_the_general_path() -> None:
    # the general writers mask to the wire width; the fast path must not differ
    assert encode_request(C_CloseSession, [(1 << 64) + 5], V026) == encode_request(
        C_CloseSession, [5], V026)
    with pytest.raises(ValueError, match="takes 2 arguments"):
        encode_request(C_GenerateRandom, [1], V026)


@pytest.mark.parametrize("mode", ["fast", "general"])
def test_malformed_fixed_requests_fail_as_before(mode: str, request: pytest.FixtureRequest) -> None:
    if mode == "general":
        request.getfixturevalue("general")
    body = encode_request(C_GenerateRandom, [7, 32], V026)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_request(body[:-1], V026)
    bad_sig = body[:8] + b"ufu" + body[11:]
    with pytest.raises(ProtocolError, match="signature"):
        decode_request(bad_sig, V026)
    with pytest.raises(ProtocolError, match="unknown call id"):
        decode_request((len(CALLS) + 1).to_bytes(4, "big") + body[4:], V026)


FRAMES = [build_frame(i + 1, bytes([i]) * (i * 7), b"opt" if i % 2 else b"")
          for i in range(6)]
STREAM = b"".join(FRAMES)


def frames_of(chunks: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    r = FrameReader()
    out = [(f.code, f.options, f.body) for c in chunks for f in r.feed(c)]
    assert r.pending() == 0
    return out


def test_frames_split_anywhere_read_the_same() -> None:
    whole = frames_of([STREAM])
    assert [c for c, _, _ in whole] == [1, 2, 3, 4, 5, 6]
    for cut in range(1, len(STREAM)):
        assert frames_of([STREAM[:cut], STREAM[cut:]]) == whole
    assert frames_of([bytes([b]) for b in STREAM]) == whole
    assert frames_of([bytearray(STREAM)]) == whole  # not bytes: the general path


def test_a_reader_that_stops_iterating_keeps_the_rest() -> None:
    r = FrameReader()
    it = r.feed(STREAM)
    first = next(it)
    it.close()  # a paused connection stops after one frame
    assert first.code == 1
    assert [f.code for f in r.feed(b"")] == [2, 3, 4, 5, 6]
    assert r.pending() == 0


def test_hostile_headers_fail_on_the_fast_path_too() -> None:
    r = FrameReader(max_frame=100)
    with pytest.raises(ProtocolError, match="too large"):
        list(r.feed((1).to_bytes(4, "big") + (0).to_bytes(4, "big") + (101).to_bytes(4, "big")))
    with pytest.raises(ProtocolError, match="call code 0"):
        list(FrameReader().feed(build_frame(0, b"x")))

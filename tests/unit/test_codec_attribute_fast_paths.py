"""The attribute codec's fast paths give exactly what the general paths give.

Templates are the costliest part of C_GetAttributeValue, C_FindObjectsInit and
C_CreateObject in the codec, so their common shapes are read and written with one struct
(codec/attributes.py: fA requests without nested bodies, the type/validity/length head
of an aA entry, and BBOOL / ULONG / byte-array values), and whole message headers are
compared in one go (codec/message.py). Each is checked here against the general path
(the fast path switched off): the same bytes, the same values, and on malformed input
the same exception type, for random and hostile inputs in every dialect."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from p11gate.codec import (
    CALLS,
    V0241,
    V025,
    V026,
    Attribute,
    AttrRequest,
    Dialect,
    Mechanism,
    Null,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from p11gate.codec import attributes as A
from p11gate.codec import message as M
from p11gate.codec.buffer import Reader, Writer
from p11gate.codec.tables import AttrClass

DIALECTS = [V0241, V025, V026]
ID = {c.name: c.id for c in CALLS}
CKA_CLASS, CKA_LABEL, CKA_SIGN, CKA_KEY_TYPE, CKA_START_DATE = 0x0, 0x3, 0x108, 0x100, 0x110
CKA_WRAP_TEMPLATE, CKA_ALLOWED_MECHANISMS = 0x40000211, 0x40000600


class _Refuses:
    """A struct stand-in whose pack always fails: the writer falls back to the general
    path exactly as it does for a value out of a struct's range."""

    size = 0

    def pack(self, *_: Any) -> bytes:
        raise struct.error("fast path off")


@contextlib.contextmanager
def general_paths() -> Iterator[None]:
    """Switch every attribute and header fast path off for the duration."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "FAST_REQUESTS", -1)
        mp.setattr(A, "FAST_HEAD", 1 << 30)
        for name in ("_HEAD_BYTE", "_HEAD_ULONG", "_HEAD_ARRAY"):
            mp.setattr(A, name, _Refuses())
        mp.setattr(M, "_QUICK_REQ", [b"\xff" * 64] * len(CALLS))
        mp.setattr(M, "_QUICK_REP", [b"\xff" * 64] * len(CALLS))
        yield


def _outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except Exception as e:  # the type is what must agree (messages may differ)
        return ("raises", type(e))


def _both(f: Any, *args: Any) -> tuple[Any, Any]:
    fast = _outcome(f, *args)
    with general_paths():
        slow = _outcome(f, *args)
    return fast, slow


def _value(rng: random.Random, d: Dialect, atype: int, depth: int = 0) -> Attribute:
    cls = d.attr_class(atype)
    big = rng.choice([0, 1, 0xFFFFFFFF, 1 << 40, -1])
    length = rng.choice([None, 0, 1, 8, 64, 0xFFFFFFFF, big])
    value: Any
    if cls is AttrClass.BYTE:
        value = rng.choice([0, 1, True, False, 255, 256, -1])
    elif cls is AttrClass.ULONG:
        value = rng.choice([0, 3, 1 << 63, (1 << 64) - 1, 1 << 64, -1])
    elif cls is AttrClass.DATE:
        value = rng.choice([b"20261203", b"", None])
    elif cls is AttrClass.MECHANISM_ARRAY:
        value = rng.choice([[1, 2, 0x1041], [], None, Null(3)])
    elif cls is AttrClass.ATTRIBUTE_ARRAY:
        value = [_value(rng, d, CKA_LABEL, depth + 1)] if depth < 2 else []
    else:
        value = rng.choice([b"ec1", b"", bytearray(b"ba"), None, bytes(rng.randrange(90))])
    if isinstance(length, int) and length < 0:
        length = None
    return Attribute(atype, value, length)


def _template(rng: random.Random, d: Dialect) -> list[Attribute]:
    types = [CKA_CLASS, CKA_LABEL, CKA_SIGN, CKA_KEY_TYPE, CKA_START_DATE,
             CKA_ALLOWED_MECHANISMS, CKA_WRAP_TEMPLATE, rng.randrange(1 << 32)]
    return [_value(rng, d, rng.choice(types)) for _ in range(rng.randrange(6))]


@pytest.mark.parametrize("d", DIALECTS, ids=lambda d: d.name)
@pytest.mark.parametrize("seed", range(40))
def test_templates_are_written_and_read_as_by_the_general_path(d: Dialect, seed: int) -> None:
    rng = random.Random(seed)
    template = _template(rng, d)

    def write() -> bytes:
        w = Writer()
        A.write_attributes(w, template, d)
        return bytes(w.buf)

    fast, slow = _both(write)
    assert fast == slow
    if fast[0] != "ok":
        return
    data = fast[1]
    flipped = bytearray(data)
    if flipped:
        flipped[rng.randrange(len(flipped))] ^= 0xFF
    # read back whole, truncated anywhere, and with a byte flipped
    for raw in (data, data[: rng.randrange(len(data) + 1)], bytes(flipped)):
        got, want = _both(lambda b=raw: A.read_attributes(Reader(b), d))
        assert got == want, raw.hex()


def test_the_random_templates_reach_the_fast_paths() -> None:
    """The comparison above is only worth something if the fast paths ran in it."""
    d = V026
    w = Writer()
    A.write_attributes(w, [Attribute(CKA_SIGN, 1, 1), Attribute(CKA_KEY_TYPE, 3, 8),
                           Attribute(CKA_LABEL, b"ec1", 3)], d)
    with general_paths():
        w2 = Writer()
        A.write_attributes(w2, [Attribute(CKA_SIGN, 1, 1), Attribute(CKA_KEY_TYPE, 3, 8),
                                Attribute(CKA_LABEL, b"ec1", 3)], d)
    assert w.buf == w2.buf
    calls = []
    real = Reader.u32

    def counting(self: Reader) -> int:
        calls.append(1)
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Reader, "u32", counting)
        A.read_attributes(Reader(bytes(w.buf)), d)
        fast_calls = len(calls)
        with general_paths():
            A.read_attributes(Reader(bytes(w.buf)), d)
    assert fast_calls < len(calls) - fast_calls  # the one-struct heads skipped u32 reads


@pytest.mark.parametrize("d", DIALECTS, ids=lambda d: d.name)
def test_attribute_requests_read_as_by_the_general_path(d: Dialect) -> None:
    rng = random.Random(11)
    for _ in range(400):
        reqs = []
        for _ in range(rng.randrange(8)):
            atype = rng.choice([CKA_CLASS, CKA_LABEL, CKA_WRAP_TEMPLATE, rng.randrange(1 << 32)])
            length = rng.choice([0, 1, 24, 48, 0xFFFFFFFF])
            nested = [AttrRequest(CKA_LABEL, 8)] if atype == CKA_WRAP_TEMPLATE else None
            reqs.append(AttrRequest(atype, length, nested))
        w = Writer()
        A.write_attr_requests(w, reqs, d)
        data = bytes(w.buf)
        for raw in (data, data[: rng.randrange(len(data) + 1)], data + b"\x00" * 3,
                    bytes(rng.randrange(256) for _ in range(rng.randrange(40)))):
            fast, slow = _both(lambda b=raw: A.read_attr_requests(Reader(b), d))
            assert fast == slow, raw.hex()


def test_a_nested_request_body_still_takes_the_general_path() -> None:
    """In ≥ 0.25.4 an ATTRIBUTE_ARRAY entry with a length carries a nested fA body: the
    one-struct read of (type, length) pairs would misread it, so it must step aside."""
    reqs = [AttrRequest(CKA_WRAP_TEMPLATE, 48, [AttrRequest(CKA_LABEL, 8), AttrRequest(0, 8)]),
            AttrRequest(CKA_LABEL, 16)]
    w = Writer()
    A.write_attr_requests(w, reqs, V026)
    assert A.read_attr_requests(Reader(bytes(w.buf)), V026) == reqs


TEMPLATE = [Attribute(CKA_CLASS, 3, 8), Attribute(CKA_LABEL, b"ec1", 3), Attribute(CKA_SIGN, 1, 1)]
REQUESTS: dict[str, list[Any]] = {
    "C_GetAttributeValue": [5, 7, [AttrRequest(CKA_KEY_TYPE, 8), AttrRequest(CKA_SIGN, 1),
                                   AttrRequest(CKA_LABEL, 64)]],
    "C_FindObjectsInit": [5, TEMPLATE],
    "C_CreateObject": [5, TEMPLATE],
    "C_SetAttributeValue": [5, 7, TEMPLATE],
    "C_SignInit": [5, Mechanism(0x1041, None), 7],
    "C_Sign": [5, b"data", 64],
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_requests_decode_as_by_the_general_path(name: str) -> None:
    cid = ID[name]
    body = encode_request(cid, REQUESTS[name], V026)
    hostile = body[:4] + b"\x00\x00\x00\x09" + body[8:]  # a signature length that lies
    other = ID["C_Logout"].to_bytes(4, "big") + body[4:]  # another call's id
    bodies: list[Any] = [body, body[:-1], body[:9], b"", hostile, other,
                         memoryview(body), bytearray(body)]
    fast = [_outcome(decode_request, b, V026) for b in bodies]
    with general_paths():
        slow = [_outcome(decode_request, b, V026) for b in bodies]
    assert fast == slow
    assert fast[0] == ("ok", (CALLS[cid], REQUESTS[name]))


def test_replies_decode_and_encode_as_by_the_general_path() -> None:
    cid = ID["C_GetAttributeValue"]
    req = [5, 7, [AttrRequest(CKA_KEY_TYPE, 8), AttrRequest(CKA_SIGN, 1),
                  AttrRequest(CKA_LABEL, 0)]]
    values = [[Attribute(CKA_KEY_TYPE, 3, 8), Attribute(CKA_SIGN, True, 1),
               Attribute(CKA_LABEL, None, 3)], 0]
    body = encode_reply(cid, values, V025, req)
    error = M.encode_error(0x150)
    cases = [(body, cid), (body[:-2], cid), (error, cid), (body, ID["C_Sign"]),
             (b"\x00" * 3, cid)]
    fast = [_outcome(decode_reply, b, V025, c, req) for b, c in cases]
    with general_paths():
        slow = [_outcome(decode_reply, b, V025, c, req) for b, c in cases]
        slow_bytes = encode_reply(cid, values, V025, req)
    assert fast == slow
    assert body == slow_bytes
    assert fast[0] == ("ok", values)

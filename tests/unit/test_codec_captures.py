"""Every frame of every recorded capture against the codec.

For each frame of ``tests/vectors/captures/*.hex`` the matching line of the ``.txt``
(an independent field-by-field decoding, see captures/README.md) is parsed, the frame is
decoded with the sending side's dialect, every field the notation carries is compared
with the decoded value, and the values are re-encoded to the identical bytes.

The vectors are test data in the repository (``tests/vectors/``); CI runs
with them present, so their absence is a failure, not a skip.
"""

from __future__ import annotations

import ast
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p11gate.codec import (
    CALLS,
    V0241,
    V026,
    Attribute,
    AttrRequest,
    Dialect,
    Mechanism,
    Null,
    ParamUpdate,
    ProtocolError,
    ReplyError,
    Version,
    decode_reply,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
    encode_request,
)
from p11gate.codec.calls import split_signature
from p11gate.codec.tables import AttrClass
from p11gate.codec.values import Ecdh1Params, PssParams

CAPTURES = Path(__file__).resolve().parents[1] / "vectors" / "captures"
FILES = sorted(CAPTURES.glob("*.hex"))

# captures/README.md: 20/21 have a 0.26.4 client, 20/22 a 0.26.4 server; all others are
# 0.24.1 on both sides.
CLIENT_NEW = {"20", "21"}
SERVER_NEW = {"20", "22"}


def client_dialect(path: Path) -> Dialect:
    return V026 if path.name[:2] in CLIENT_NEW else V0241


def server_dialect(path: Path) -> Dialect:
    return V026 if path.name[:2] in SERVER_NEW else V0241


def test_captures_are_present() -> None:
    assert CAPTURES.is_dir(), f"capture directory missing: {CAPTURES}"
    assert len(FILES) >= 18, f"expected the 18 capture files under {CAPTURES}"
    for p in FILES:
        assert p.with_suffix(".txt").is_file(), f"{p.name} has no .txt"


# --------------------------------------------------------------------- .hex / .txt


@dataclass
class Unit:
    direction: str  # "C>S" or "S>C"
    data: bytes
    line: str  # the matching .txt line


def load(path: Path) -> list[Unit]:
    hexes = [ln for ln in path.read_text().splitlines() if ln[:4] in ("C>S ", "S>C ")]
    txts = [ln for ln in path.with_suffix(".txt").read_text().splitlines()
            if ln[:4] in ("C>S ", "S>C ")]
    assert len(hexes) == len(txts), f"{path.name}: .hex and .txt differ in length"
    out = []
    for h, t in zip(hexes, txts, strict=True):
        assert h[:3] == t[:3], f"direction mismatch: {h[:40]} / {t[:40]}"
        out.append(Unit(h[:3], bytes.fromhex(h[4:].strip()), t))
    return out


class Text:
    """A tiny cursor-based parser for the .txt value notation."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def peek(self, lit: str) -> bool:
        return self.s.startswith(lit, self.i)

    def eat(self, lit: str) -> None:
        assert self.s.startswith(lit, self.i), f"expected {lit!r} at {self.s[self.i:][:60]!r}"
        self.i += len(lit)

    def maybe(self, lit: str) -> bool:
        if self.peek(lit):
            self.i += len(lit)
            return True
        return False

    def match(self, pattern: str) -> re.Match[str]:
        m = re.compile(pattern).match(self.s, self.i)
        assert m is not None, f"{pattern!r} does not match {self.s[self.i:][:60]!r}"
        self.i = m.end()
        return m

    def int(self) -> int:
        return int(self.match(r"0x[0-9a-f]+|\d+").group(0), 0)

    def skip_spaces(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def at_end(self) -> bool:
        return self.s[self.i:].strip() == ""


@dataclass
class HexData:
    """``ay``-style bytes as printed: possibly truncated to a prefix plus the length."""

    prefix: bytes
    length: int

    def check(self, v: Any) -> None:
        assert isinstance(v, bytes), v
        assert len(v) == self.length and v.startswith(self.prefix)


def parse_hexdata(t: Text) -> HexData | None:
    if t.maybe("NULL"):
        return None
    h = t.match(r"[0-9a-f]*").group(0)
    prefix = bytes.fromhex(h)
    if t.maybe("..."):
        n = int(t.match(r"\((\d+) bytes\)").group(1))
        return HexData(prefix, n)
    return HexData(prefix, len(prefix))


def parse_attr(t: Text) -> tuple[Any, ...]:
    atype = t.int()
    t.eat(":")
    if t.maybe("INVALID"):
        return (atype, "INVALID")
    length = int(t.match(r"len=(\d+)").group(1))
    t.eat(":")
    kind = t.match(r"[a-z]+").group(0)
    value: Any
    if kind == "attrs":
        t.eat("[")
        value = parse_attr_list(t, "]")
    else:
        t.eat(" ")
        if kind in ("ulong", "bool"):
            value = t.int()
        elif kind in ("bytes", "date"):
            value = parse_hexdata(t)
        elif kind == "mechs":
            if t.maybe("count="):
                value = ("count", t.int())
                t.match(r" \([^)]*\)")
            else:
                t.eat("[")
                value = [] if t.maybe("]") else parse_list(t)
        else:
            raise AssertionError(f"unknown attribute notation {kind}")
    return (atype, kind, length, value)


def parse_attr_list(t: Text, close: str) -> list[tuple[Any, ...]]:
    out = []
    if t.maybe(close):
        return out
    while True:
        out.append(parse_attr(t))
        if t.maybe(close):
            return out
        t.eat("; ")


def parse_list(t: Text) -> list[int]:
    """After ``[``: ints separated by ``, `` up to ``]``."""
    out = [t.int()]
    while not t.maybe("]"):
        t.eat(", ")
        out.append(t.int())
    return out


def parse_mechanism(t: Text) -> Any:
    if t.maybe("NULL-mechanism"):
        return None
    mtype = t.int()
    if t.maybe("(no param)") or t.maybe(" param=NULL"):
        return (mtype, None)
    t.eat(" ")
    name = t.match(r"[A-Za-z0-9_]+").group(0)
    t.eat("(")
    fields: dict[str, Any] = {}
    while not t.maybe(")"):
        key = t.match(r"(\w+)=").group(1)
        if key in ("shared", "public"):
            fields[key] = parse_hexdata(t)
        else:
            fields[key] = t.int()
        t.maybe(",")
    return (mtype, name, fields)


def parse_value(t: Text, code: str) -> Any:
    if code in ("u", "y", "fy", "fu"):
        return t.int()
    if code == "v":
        m = t.match(r"(\d+)\.(\d+)")
        return Version(int(m.group(1)), int(m.group(2)))
    if code in ("s", "z"):
        m = t.match(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")
        return ast.literal_eval(m.group(0))
    if code == "ay":
        if t.maybe("absent(len="):
            n = t.int()
            t.eat(")")
            return Null(n)
        return parse_hexdata(t)
    if code == "au":
        if t.maybe("absent(count="):
            n = t.int()
            t.eat(")")
            return Null(n)
        t.eat("[")
        return [] if t.maybe("]") else parse_list(t)
    if code == "fA":
        n = t.int()
        t.eat("{")
        reqs = []
        while not t.maybe("}"):
            atype = t.int()
            t.eat("/")
            reqs.append((atype, t.int()))
            t.maybe("; ")
        assert len(reqs) == n
        return reqs
    if code == "aA":
        n = t.int()
        t.eat("{")
        attrs = parse_attr_list(t, "}")
        assert len(attrs) == n
        return attrs
    if code == "M":
        return parse_mechanism(t)
    if code == "P":
        return bool(int(t.match(r"has_param=(\d)").group(1)))
    raise AssertionError(f"no notation for {code}")


HEAD = re.compile(
    r"^(C>S|S>C) code=(0x[0-9a-f]+) opts=b'([^']*)' (\w+)\((\d+)\) sig='([^']*)' ?"
)


@dataclass
class Parsed:
    code: int
    options: bytes
    name: str
    call_id: int
    signature: str
    values: list[tuple[str, Any]]


def parse_line(line: str) -> Parsed:
    m = HEAD.match(line)
    assert m is not None, line
    t = Text(line[m.end():])
    values: list[tuple[str, Any]] = []
    for code in split_signature(m.group(6)):
        t.skip_spaces()
        if t.at_end():
            break  # e.g. the C_DeriveKey2 reply ends after P on BUFFER_TOO_SMALL
        t.eat(f"{code}:")
        values.append((code, parse_value(t, code)))
    assert t.at_end(), f"unparsed rest: {t.s[t.i:]!r}"
    return Parsed(int(m.group(2), 16), m.group(3).encode(), m.group(4), int(m.group(5)),
                  m.group(6), values)


# --------------------------------------------------------------------- comparison


def check_attr(exp: tuple[Any, ...], got: Attribute, d: Dialect) -> None:
    assert got.type == exp[0]
    if exp[1] == "INVALID":
        assert got.length is None and got.value is None
        return
    _, kind, length, value = exp
    assert got.length == length
    cls = d.attr_class(got.type)
    expected_cls = {
        "ulong": AttrClass.ULONG, "bool": AttrClass.BYTE, "bytes": AttrClass.BYTE_ARRAY,
        "date": AttrClass.DATE, "mechs": AttrClass.MECHANISM_ARRAY,
        "attrs": AttrClass.ATTRIBUTE_ARRAY,
    }[kind]
    assert cls is expected_cls, f"attribute {got.type:#x}: {cls} vs {kind}"
    if kind in ("ulong", "bool"):
        assert got.value == value
    elif kind in ("bytes", "date"):
        if value is None:
            assert got.value is None
        else:
            value.check(got.value)
    elif kind == "mechs":
        if isinstance(value, tuple):
            assert got.value == Null(value[1])
        else:
            assert got.value == value
    else:
        assert isinstance(got.value, list) and len(got.value) == len(value)
        for e, g in zip(value, got.value, strict=True):
            check_attr(e, g, d)


def check_mechanism(exp: Any, got: Mechanism | None) -> None:
    if exp is None:
        assert got is None
        return
    assert got is not None and got.type == exp[0]
    if len(exp) == 2:
        assert got.param is None
        return
    _, name, f = exp
    if name == "PSS":
        assert got.param == PssParams(f["hashAlg"], f["mgf"], f["sLen"])
    elif name == "ECDH1":
        p = got.param
        assert isinstance(p, Ecdh1Params) and p.kdf == f["kdf"]
        for key, have in (("shared", p.shared_data), ("public", p.public_data)):
            if f[key] is None:
                assert have is None
            else:
                f[key].check(have)
    else:
        raise AssertionError(f"no check for mechanism notation {name}")


def check_value(code: str, exp: Any, got: Any, d: Dialect) -> None:
    if code in ("u", "y", "fy", "fu", "v", "s", "z"):
        assert got == exp, (code, exp, got)
    elif code == "ay":
        if exp is None or isinstance(exp, Null):
            assert got == exp
        else:
            exp.check(got)
    elif code == "au":
        assert got == exp
    elif code == "fA":
        assert [(a.type, a.length) for a in got] == exp
        assert all(isinstance(a, AttrRequest) for a in got)
    elif code == "aA":
        assert len(got) == len(exp)
        for e, g in zip(exp, got, strict=True):
            check_attr(e, g, d)
    elif code == "M":
        check_mechanism(exp, got)
    elif code == "P":
        assert isinstance(got, ParamUpdate) and got.present is exp
    else:
        raise AssertionError(code)


def check_values(parsed: Parsed, codes: tuple[str, ...], got: list[Any], d: Dialect) -> int:
    assert [c for c, _ in parsed.values] == list(codes[: len(parsed.values)])
    assert len(got) == len(parsed.values), (parsed.name, got, parsed.values)
    for (code, exp), g in zip(parsed.values, got, strict=True):
        check_value(code, exp, g, d)
    return len(got)


def body_of(frame: bytes) -> tuple[int, bytes, bytes]:
    code, olen, blen = struct.unpack_from(">III", frame)
    assert len(frame) == 12 + olen + blen, "frame length does not match its header"
    return code, frame[12:12 + olen], frame[12 + olen:]


# --------------------------------------------------------------------- the tests


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_capture(path: Path) -> None:
    cd, sd = client_dialect(path), server_dialect(path)
    units = load(path)
    # the version bytes
    (cv, sv) = units[0], units[1]
    assert (cv.direction, sv.direction) == ("C>S", "S>C")
    assert len(cv.data) == 1 and len(sv.data) == 1
    assert cv.line == f"C>S version byte {cv.data[0]}"
    assert sv.line == f"S>C version byte {sv.data[0]}"
    offer, answer = cv.data[0], sv.data[0]
    # a client offers its maximum, which names its generation (SPEC §1.4)
    assert dialect_for_version(offer) is cd
    # a server answers min(offer, its maximum)
    assert answer == min(offer, 2 if sd is V026 else 0)
    if offer == 2:
        # asked for 2, the answer names the server's generation
        assert dialect_for_version(answer) is sd

    pending: dict[int, tuple[int, list[Any]]] = {}
    checked = 0
    for u in units[2:]:
        code, options, body = body_of(u.data)
        if "DECODE FAILURE" in u.line:
            check_capture_21_failure(path, u, body)
            continue
        p = parse_line(u.line)
        assert p.code == code and p.options == options
        if u.direction == "C>S":
            call, args = decode_request(body, cd)
            assert (call.name, call.id, call.request) == (p.name, p.call_id, p.signature)
            checked += check_values(p, call.req_codes, args, cd)
            assert encode_request(call.id, args, cd) == body
            assert code not in pending, "call code reused while in flight"
            pending[code] = (call.id, args)
        else:
            call_id, args = pending.pop(code)  # replies are matched by call code
            try:
                values = decode_reply(body, sd, call_id, args)
            except ReplyError as e:
                assert (p.name, p.call_id, p.signature) == ("ERROR", 0, "u")
                assert p.values == [("u", e.rv)]
                assert encode_error(e.rv) == body
                checked += 1
                continue
            call = CALLS[call_id]
            assert (p.name, p.call_id, p.signature) == (call.name, call.id, call.reply)
            checked += check_values(p, call.rep_codes, values, sd)
            assert encode_reply(call_id, values, sd, args) == body
    assert checked or len(units) <= 4


def check_capture_21_failure(path: Path, u: Unit, body: bytes) -> None:
    """README: the 0.26.4 client's first new-style C_SignInit cannot be parsed by the
    0.24.1 server, which drops the connection; the independent decoder fails too."""
    assert path.name.startswith("21-") and u.direction == "C>S"
    assert u.line.split()[-1] == u.data.hex()
    # read as the 0.24.1 server reads it: the bare ECDSA type is followed by a byte
    # array length taken from the key handle, and the frame runs out
    with pytest.raises(ProtocolError):
        decode_request(body, V0241)
    # read in the client's own dialect it is a perfectly good C_SignInit
    call, args = decode_request(body, V026)
    assert call.name == "C_SignInit"
    assert args == [0x11, Mechanism(0x1041, None), 3]
    assert encode_request(call.id, args, V026) == body


def test_capture_21_connection_dies_after_the_mismatch() -> None:
    units = load(CAPTURES / "21-v0264-client-v0241-server.hex")
    lines = [u.line for u in units]
    fail = [i for i, ln in enumerate(lines) if "DECODE FAILURE" in ln]
    assert len(fail) == 1
    # nothing answers that frame: the server closed the connection
    code = body_of(units[fail[0]].data)[0]
    assert not any(u.direction == "S>C" and body_of(u.data)[0] == code
                   for u in units[2:] if "DECODE FAILURE" not in u.line)


def test_capture_22_old_mechanism_misread_by_new_server() -> None:
    """0.24.1 client → 0.26.4 server: the old `ffffffff` after ECDSA is part of the key
    handle for a new-generation reader (SPEC §1.4, capture 22)."""
    units = load(CAPTURES / "22-v0241-client-v0264-server.hex")
    for u in units[2:]:
        _, _, body = body_of(u.data)
        if u.direction == "C>S" and parse_line(u.line).name == "C_SignInit":
            _, old = decode_request(body, V0241)
            assert old[1] == Mechanism(0x1041, None)
            _, new = decode_request(body, V026)
            assert new[1] == Mechanism(0x1041, None) and new[2] != old[2]
            assert new[2] >> 32 == 0xFFFFFFFF
            return
    raise AssertionError("no C_SignInit in capture 22")


def test_dialect_for_version() -> None:
    assert dialect_for_version(0) is V0241
    assert dialect_for_version(1).version == 1
    assert not dialect_for_version(1).new_mechanisms
    assert dialect_for_version(2) is V026
    assert dialect_for_version(255) is V026


def test_parser_self_check() -> None:
    p = parse_line(
        "S>C code=0x17 opts=b'' C_GetAttributeValue(24) sig='aAu' aA:3{0x111:len=0:date "
        "NULL; 0x40000211:len=24:attrs[0x0:len=8:ulong 0x4]; 0x40000600:len=16:mechs "
        "count=2 (no elements: server had no buffer)} u:0x0"
    )
    assert p.values[0][1][1] == (0x40000211, "attrs", 24, [(0, "ulong", 8, 4)])
    assert p.values[0][1][2][3] == ("count", 2)
    assert p.values[1] == ("u", 0)

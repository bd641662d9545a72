"""Every frame of every real capture decodes to the values its .txt lists and re-encodes
to the identical bytes (tests/vectors/captures, recorded from p11-kit 0.24.1/0.26.4)."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest

from p11gate.codec import (
    CALLS,
    V0241,
    V026,
    Null,
    ProtocolError,
    ReplyError,
    decode_reply,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
    encode_request,
)

CAPTURES = Path(__file__).resolve().parents[1] / "vectors" / "captures"
FILES = sorted(CAPTURES.glob("*.hex"))

# the release of each side (captures/README.md): 20/21 have a 0.26.4 client, 20/22 a
# 0.26.4 server, every other capture is 0.24.1 on both sides
CLIENT_NEW = {"20", "21"}
SERVER_NEW = {"20", "22"}


def test_captures_are_there() -> None:
    # the vectors are part of the repository: missing ones are a failure
    assert len(FILES) >= 18, f"captures not found under {CAPTURES}"


def units(path: Path) -> list[tuple[str, bytes]]:
    out = []
    for line in path.read_text().splitlines():
        if line[:4] in ("C>S ", "S>C "):
            out.append((line[:3], bytes.fromhex(line[4:].strip())))
    return out


def txt_lines(path: Path) -> list[str]:
    return [ln for ln in path.with_suffix(".txt").read_text().splitlines()
            if ln[:4] in ("C>S ", "S>C ")]


_HEAD = re.compile(r"^(C>S|S>C) code=(0x[0-9a-f]+) opts=b'([^']*)' (\w+)\((\d+)\) sig='([^']*)'")


def scalar_fields(txt: str) -> list[str]:
    """The simple `u:`/`y:`/`fy:`/`fu:` values of a .txt line, in order."""
    return re.findall(r"(?<![\w:])(u|y|fy|fu):(0x[0-9a-f]+|\d+)", txt)


def flatten(values: list[Any], codes: tuple[str, ...]) -> list[tuple[str, int]]:
    return [(c, v) for c, v in zip(codes, values, strict=False)
            if c in ("u", "y", "fy", "fu") and isinstance(v, int)]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_capture_round_trip(path: Path) -> None:
    name = path.name[:2]
    cd = V026 if name in CLIENT_NEW else V0241
    sd = V026 if name in SERVER_NEW else V0241
    seq = units(path)
    txt = txt_lines(path)
    assert len(txt) == len(seq)
    (_, cver), (_, sver) = seq[0], seq[1]
    assert len(cver) == 1 and len(sver) == 1
    # the version byte the client offers tells its generation (SPEC §1.4)
    assert dialect_for_version(cver[0]).new_mechanisms == (name in CLIENT_NEW)
    pending: dict[int, tuple[int, list[Any]]] = {}
    for (direction, frame), line in zip(seq[2:], txt[2:], strict=True):
        code, olen, blen = struct.unpack_from(">III", frame)
        assert len(frame) == 12 + olen + blen
        body = frame[12 + olen:]
        if "DECODE FAILURE" in line:
            # capture 21: the frame the 0.24.1 server could not parse (README); a 0.24
            # reading fails, the client's own (0.26) reading round-trips
            assert name == "21"
            with pytest.raises(ProtocolError):
                decode_request(body, V0241)
            call, args = decode_request(body, cd)
            assert encode_request(call.id, args, cd) == body
            continue
        m = _HEAD.match(line)
        assert m is not None, line
        assert int(m.group(2), 16) == code
        assert m.group(3).encode() == frame[12:12 + olen]
        if direction == "C>S":
            call, args = decode_request(body, cd)
            assert (call.name, call.id, call.request) == (m.group(4), int(m.group(5)),
                                                          m.group(6))
            assert encode_request(call.id, args, cd) == body
            expect = [(c, int(v, 0)) for c, v in scalar_fields(line.split("sig=", 1)[1])]
            got = flatten(args, call.req_codes)
            assert [v for _, v in got][: len(expect)] == [v for _, v in expect][: len(got)]
            pending[code] = (call.id, args)
        else:
            call_id, args = pending.pop(code)
            try:
                values = decode_reply(body, sd, call_id, args)
            except ReplyError as e:
                assert m.group(4) == "ERROR"
                assert int(scalar_fields(line)[0][1], 0) == e.rv
                assert encode_error(e.rv) == body
                continue
            assert m.group(4) == CALLS[call_id].name
            assert encode_reply(call_id, values, sd, args) == body
            codes = CALLS[call_id].rep_codes
            for code_, v in zip(codes, values, strict=False):
                if code_ == "au" and isinstance(v, list):
                    listed = re.search(r"au:\[([^\]]*)\]", line)
                    assert listed is not None
                    assert [int(x, 0) for x in listed.group(1).split(", ") if x] == v
                if code_ == "au" and isinstance(v, Null):
                    assert f"au:absent(count={v.length})" in line
                if code_ == "ay" and isinstance(v, bytes) and len(v) <= 32:
                    assert f"ay:{v.hex()}" in line


def test_capture_21_is_the_expected_mismatch() -> None:
    """0.26.4 client → 0.24.1 server: the new-style C_SignInit misparses as old-style."""
    seq = units(CAPTURES / "21-v0264-client-v0241-server.hex")
    requests = [f for d, f in seq[2:] if d == "C>S"]
    sign_inits = []
    for frame in requests:
        olen = struct.unpack_from(">I", frame, 4)[0]
        body = frame[12 + olen:]
        call, _ = decode_request(body, V026)
        if call.name == "C_SignInit":
            sign_inits.append(body)
    assert sign_inits
    with pytest.raises((ProtocolError, AssertionError)):
        call, args = decode_request(sign_inits[0], V0241)
        # if it decodes at all, it does not mean the same thing
        assert encode_request(call.id, args, V026) == sign_inits[0]


def test_dialect_choice() -> None:
    assert dialect_for_version(0) is V0241
    assert dialect_for_version(2) is V026
    assert dialect_for_version(255) is V026
    assert not dialect_for_version(1).new_mechanisms and dialect_for_version(1).version == 1


def test_the_codec_tables_are_generated_from_the_vectors() -> None:
    """src/p11gate/codec/tables_data.py is what scripts/gen_tables_data.py makes of
    tests/vectors/tables.json (the per-release p11-kit tables), byte for byte."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "scripts" / "gen_tables_data.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

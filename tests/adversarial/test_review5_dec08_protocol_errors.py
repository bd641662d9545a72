"""Review 2026-12-08: a client's stream bytes reached the log in protocol errors.

A frame the gateway cannot parse closes the connection with a warning naming the
reason; that reason quoted what it had read: a wrong signature in full (``repr`` of
up to a frame's worth of bytes), and the lengths, counts and call id that were out of
range (four bytes each, in decimal or hex). In a desynchronised or hostile stream
those bytes are anything the client sent -- its PIN among them: a C_Login whose bytes
are read as a header, a signature or a length put the PIN into the log, readable
wherever logs go. Now a protocol error names what was wrong and the limit it broke,
never a value read from the stream (a short signature made of signature letters, a
client of another protocol version, is still shown).

Real gateway over SoftHSM at log level debug, raw frames; every output is scanned:
the log, the audit file, a metrics scrape and ``p11gate status``.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_TOKEN,
    CKA_VALUE,
    CKF_RW,
    CKF_SERIAL,
    CKK_AES,
    CKO_SECRET_KEY,
    CKU_SO,
    CKU_USER,
    ID,
    b,
    call,
    rv,
    s,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient
from tests.metrics_scrape import http
from tests.policy.tenants import remove, shared_socket_dir
from tests.softhsm import make_token

from p11gate.codec import V0241, build_frame, ckr, encode_request

PIN = "pt-pin-5"
#: the secret a client puts on the wire: as a PIN, and as key material
MARKER = b"PINMARKq7Zx9w3Kv"
#: a PIN whose first bytes, read as a byte array's length, are out of range
WIDE = "\u00e9PINMARK-w3Kv".encode()
CKU_CONTEXT_SPECIFIC = 2


def forms(secret: bytes) -> list[str]:
    """Every way a log could show ``secret`` or a piece of it: the text, its hex, and
    each 4-byte window read as a big-endian u32 (decimal, ``0x`` hex)."""
    out = [secret.decode(), secret.hex(), secret.hex().upper()]
    for i in range(len(secret) - 3):
        (n,) = struct.unpack(">I", secret[i:i + 4])
        out += [str(n), f"{n:#x}"]
    return out


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("protoerr")
    tok = make_token(base / "softhsm", label="pt", pin=PIN, keys=False)
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
log_format = "text"
log_level = "debug"

[audit]
file = "{base / 'audit.jsonl'}"

[metrics]
listen = "unix:path={base / 'metrics.sock'}"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[token]]
name = "pt"
backend = "softhsm"
select = {{ label = "pt" }}
""")
    g = Gateway(cfg)
    g.base = base  # type: ignore[attr-defined]
    g.cfg = cfg  # type: ignore[attr-defined]
    yield g
    stop_gateway(g, lambda: remove(sockdir))


def outputs(gw: Gateway) -> dict[str, str]:
    base: Path = gw.base  # type: ignore[attr-defined]
    status = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--json",
                             "--config", str(gw.cfg)],  # type: ignore[attr-defined]
                            capture_output=True, text=True, timeout=30)
    code, metrics = http(str(base / "metrics.sock"))
    assert code == 200 and status.returncode == 0, status.stderr
    return {"log": gw.log(), "audit": (base / "audit.jsonl").read_text(),
            "metrics": metrics.decode(), "status": status.stdout + status.stderr}


def assert_not_shown(gw: Gateway, secret: bytes) -> None:
    for where, text in outputs(gw).items():
        for form in forms(secret):
            assert form not in text, f"{form!r} (from {secret!r}) in the {where}"


def closed_after(gw: Gateway, data: bytes) -> bool:
    """Send ``data`` after C_Initialize on a new connection: closed by the gateway
    (after the replies to the whole frames before the bad one)?"""
    c = RawClient(gw.path)
    try:
        c.initialize()
        c.send_raw(data)
        for _ in range(4):
            if c.recv_frame() is None:
                return True
        return False
    finally:
        c.close()


def frame(body: bytes) -> bytes:
    return build_frame(0x77, body, b"client")


def login_body(pin: bytes) -> bytes:
    return encode_request(ID("C_Login"), [1, CKU_USER, pin], V0241)


def test_a_pin_read_as_a_frame_header_is_not_logged(gw: Gateway) -> None:
    # a desynchronised stream: the PIN where the next frame's header is expected
    info = encode_request(ID("C_GetInfo"), [], V0241)
    assert closed_after(gw, frame(info) + MARKER)
    # the header itself made of the PIN, either length out of range
    assert closed_after(gw, b"\0\0\0\x01" + MARKER[:8])
    assert closed_after(gw, b"\0\0\0\x01\0\0\0\x06" + MARKER[:4])
    assert "frame too large" in gw.log()
    assert_not_shown(gw, MARKER)


def test_a_pin_read_as_a_signature_length_or_call_id_is_not_logged(gw: Gateway) -> None:
    body = login_body(MARKER)
    head = len(body) - 4 - len(MARKER)  # call id, signature, session, user type
    # the PIN where the signature is (a client of some other layout)
    sig = struct.pack(">I", ID("C_Login")) + struct.pack(">I", len(MARKER)) + MARKER
    assert closed_after(gw, frame(sig + body[head:]))
    # the PIN's bytes read as the PIN's length (out of range)
    assert closed_after(gw, frame(body[:head] + WIDE))
    # ... as a call id
    assert closed_after(gw, frame(MARKER[:4] + body[4:]))
    # ... as an attribute count (C_CreateObject)
    create = encode_request(ID("C_CreateObject"), [1, []], V0241)
    assert closed_after(gw, frame(create[:-4] + MARKER))
    log = gw.log()
    assert "signature of 16 bytes" in log and "byte array length out of range" in log
    assert "unknown call id" in log and "attribute count out of range" in log
    assert_not_shown(gw, MARKER)
    assert_not_shown(gw, WIDE)
    # a short signature that reads as one is still shown (another protocol version)
    assert closed_after(gw, frame(struct.pack(">I", ID("C_Login")) + b"\0\0\0\x02uu"))
    assert "C_Login: signature b'uu' != b'uuay'" in gw.log()


def test_refused_calls_with_secrets_show_none_of_them(gw: Gateway) -> None:
    """Well-formed calls carrying the marker that the gateway or the module refuses
    (wrong PINs past the lock-out, SO and context-specific logins, PIN changes, a
    duplicated CKA_VALUE, a read-only CKA_VALUE change): no output shows it."""
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
    assert rv(c, "C_Login", sess, CKU_USER, PIN.encode()) == ckr.OK
    key = [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, False)]
    assert rv(c, "C_CreateObject", sess, [*key, s(CKA_VALUE, MARKER),
                                          s(CKA_VALUE, MARKER[::-1])]) \
        == ckr.TEMPLATE_INCONSISTENT
    (h,) = call(c, "C_CreateObject", sess, [*key, s(CKA_VALUE, MARKER)])
    assert rv(c, "C_SetAttributeValue", sess, h, [s(CKA_VALUE, MARKER[::-1])]) \
        == ckr.ATTRIBUTE_READ_ONLY
    assert rv(c, "C_Login", sess, CKU_CONTEXT_SPECIFIC, MARKER) != ckr.OK
    assert rv(c, "C_SetPIN", sess, MARKER, MARKER[::-1]) == ckr.PIN_INCORRECT
    assert rv(c, "C_Logout", sess) == ckr.OK
    got = [rv(c, "C_Login", sess, CKU_USER, MARKER) for _ in range(8)]
    assert ckr.PIN_INCORRECT in got and got[-1] == ckr.PIN_LOCKED, got
    assert rv(c, "C_Login", sess, CKU_SO, MARKER) != ckr.OK
    assert rv(c, "C_InitToken", slots[0], MARKER, b"x".ljust(32)) != ckr.OK
    c.close()
    for secret in (MARKER, MARKER[::-1], PIN.encode()):
        assert_not_shown(gw, secret)

"""Error precedence (issue 15 point 6) against a hostile client: a key handle the
gateway cannot translate gets the module's handle-independent refusal (function not
supported, mechanism invalid, no operation active), but the handle itself — another
connection's, or a guessed one — never reaches the module: the module sees only
CK_INVALID_HANDLE (0) in its place, and a cached answer is not asked again."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import Gateway, RawClient, rv_of, wait_for, write_config
from tests.softhsm import make_token, requires_softhsm

from p11gate.codec import V026, Attribute, Mechanism, ckr
from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.codec.values import Ecdh1Params

pytestmark = requires_softhsm

SHIM = Path(__file__).with_name("recording_module.py")
ID = {n: c.id for n, c in CALLS_BY_NAME.items()}
RSA, ECDSA = Mechanism(0x1, None), Mechanism(0x1041, None)
BOGUS = Mechanism(0x8FFF0001, None)


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    token = make_token(tmp_path / "hsm")
    record = tmp_path / "handles.txt"
    record.touch()
    extra = f'worker_command = ["{sys.executable}", "{SHIM}", "{record}", "{token["module"]}"]'
    gw = Gateway(write_config(tmp_path, token, extra_backend=extra))
    yield gw, record
    alive = gw.alive()
    rc = gw.stop()
    assert alive and rc == 0, gw.log()[-3000:]


def client(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path, version=2, dialect=V026)
    c.initialize()
    (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
    (s,) = c.call(ID["C_OpenSession"], [slots[0], 6])
    return c, s


def _settled(record: Path) -> bool:
    time.sleep(0.3)
    n = len(lines(record))
    time.sleep(0.3)
    return len(lines(record)) == n


def lines(record: Path) -> list[list[int]]:
    return [[int(x) for x in ln.split()] for ln in record.read_text().splitlines()]


def test_foreign_handles_never_reach_the_module(recorded: tuple[Gateway, Path]) -> None:
    gw, record = recorded
    a, sa = client(gw)
    a.call(ID["C_Login"], [sa, 1, b"1234"])
    priv = [Attribute(0, 3, 8)]
    keys_a = a.find(sa, priv)
    assert len(keys_a) == 2
    a.call(ID["C_SignInit"], [sa, ECDSA, a.find(sa, [*priv, Attribute(0x102, b"\x01", 1)])[0]])
    used = lines(record)
    assert used and used[-1][0] == ID["C_SignInit"] and used[-1][1] != 0
    backend_handles = {h for ln in used for h in ln[1:]}

    b, sb = client(gw)
    b.call(ID["C_Login"], [sb, 1, b"1234"])  # b may use keys: only a's handles are foreign
    # a's handles, the backend's own numbers, guesses
    hostile = sorted({*keys_a, *backend_handles, *range(1, 40), 0x7777})
    mine = set(b.find(sb, []))
    hostile = [h for h in hostile if h not in mine]
    # the gateway reads the identity of what b found (its own calls, on its own
    # session): let those finish before counting what reaches the module
    assert wait_for(lambda: _settled(record), timeout=5)
    before = len(lines(record))
    ecdh = Mechanism(0x1050, Ecdh1Params(1, None, b"\x04" + b"\x01" * 64))
    secret = [Attribute(0, 4, 8), Attribute(0x100, 0x10, 8)]
    for h in hostile:
        # handle-independent refusals of the module come first ...
        assert rv_of(b, ID["C_SignRecoverInit"], [sb, RSA, h]) == ckr.FUNCTION_NOT_SUPPORTED
        assert rv_of(b, ID["C_VerifyRecoverInit"], [sb, RSA, h]) == ckr.FUNCTION_NOT_SUPPORTED
        assert rv_of(b, ID["C_DigestKey"], [sb, h]) == ckr.OPERATION_NOT_INITIALIZED
        # ... else the code for the argument's role
        assert rv_of(b, ID["C_SignInit"], [sb, ECDSA, h]) == ckr.KEY_HANDLE_INVALID
        assert rv_of(b, ID["C_SignInit"], [sb, BOGUS, h]) == ckr.KEY_HANDLE_INVALID
        assert rv_of(b, ID["C_WrapKey"], [sb, Mechanism(0x2109, None), h, h, 64]) == \
            ckr.WRAPPING_KEY_HANDLE_INVALID
        assert rv_of(b, ID["C_DeriveKey"], [sb, ecdh, h, secret]) == ckr.KEY_HANDLE_INVALID
        assert rv_of(b, ID["C_GetAttributeValue"], [sb, h, []]) == ckr.OBJECT_HANDLE_INVALID
    b.call(ID["C_DigestInit"], [sb, Mechanism(0x250, None)])
    for h in hostile[:5]:
        assert rv_of(b, ID["C_DigestKey"], [sb, h]) == ckr.KEY_HANDLE_INVALID
    probes = lines(record)[before:]
    # the module saw every probe with CK_INVALID_HANDLE only, never a client's number
    assert probes, "no probe reached the module"
    assert all(h == 0 for ln in probes for h in ln[1:]), probes
    by_call: dict[int, int] = {}
    for ln in probes:
        by_call[ln[0]] = by_call.get(ln[0], 0) + 1
    # CKR_FUNCTION_NOT_SUPPORTED is cached per (backend, call, mechanism): asked once
    assert by_call.get(ID["C_SignRecoverInit"]) == 1, by_call
    assert by_call.get(ID["C_VerifyRecoverInit"]) == 1, by_call
    # answers that depend on the session or the handle are asked each time
    assert by_call.get(ID["C_DigestKey"]) == len(hostile) + 5, by_call
    # a's operation and keys are untouched
    (sig,) = a.call(ID["C_Sign"], [sa, b"\x01" * 32, 64])
    assert len(sig) == 64
    a.close()
    b.close()


def test_a_valid_handle_still_reaches_the_module(recorded: tuple[Gateway, Path]) -> None:
    """The precedence path is only for handles that do not translate."""
    gw, record = recorded
    a, sa = client(gw)
    a.call(ID["C_Login"], [sa, 1, b"1234"])
    (rsa_key,) = a.find(sa, [Attribute(0, 3, 8), Attribute(0x102, b"\x02", 1)])
    assert rv_of(a, ID["C_SignRecoverInit"], [sa, RSA, rsa_key]) == ckr.FUNCTION_NOT_SUPPORTED
    last: list[Any] = lines(record)[-1]
    assert last[0] == ID["C_SignRecoverInit"] and last[1] != 0
    a.close()

"""Review 2026-12-07: C_Login(CKU_CONTEXT_SPECIFIC) went to the module with the
client's PIN, unchecked and uncounted.

On a ``mapped`` token the client logs in with its own PIN and must never learn the
backend's; but a logged-in client with a CKA_ALWAYS_AUTHENTICATE key (a session key pair
it may make itself) could call C_SignInit and then C_Login(CKU_CONTEXT_SPECIFIC, guess)
as often as it liked: CKR_PIN_INCORRECT for a wrong guess, CKR_OK for the backend PIN
(an unthrottled oracle for it), and its own PIN, the one it logged in with, did not work.
On any token those guesses reached the device unthrottled (a real HSM counts them: one
tenant could lock the PIN every tenant shares). Now the client proves again what its
login proved, wrong PINs are throttled like those of C_Login and never reach the module,
and the module gets the credential the gateway holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_ALWAYS_AUTHENTICATE,
    CKA_SIGN,
    CKF_RW,
    CKF_SERIAL,
    CKM_ECDSA,
    CKU_USER,
    b,
    call,
    rv,
    session_ec_key_pair,
    stop_gateway,
)
from tests.gateway_proc import Gateway, RawClient
from tests.policy.tenants import raw, remove, shared_socket_dir, slot_of
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr
from p11gate.frontend.pins import hash_pin

BACKEND_PIN = "Backend-Secret-7"
OWN_PIN = "my-own-pin-7"
PT_PIN = "pt-pin-7"
CKU_CONTEXT_SPECIFIC = 2


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("ctxlogin")
    hsm = base / "softhsm"
    first = make_token(hsm, label="mapped", pin=BACKEND_PIN, keys=False)
    make_token(hsm, label="mapped2", pin=BACKEND_PIN, keys=False)
    make_token(hsm, label="pt", pin=PT_PIN, keys=False)
    (base / "backend.pin").write_text(BACKEND_PIN + "\n")
    (base / "backend.pin").chmod(0o600)
    sockdir = shared_socket_dir()
    mapped = (f'pin_mode = "mapped"\nbackend_pin_file = "{base / "backend.pin"}"\n'
              f'pins = {{ "uid:0" = "{hash_pin(OWN_PIN.encode())}" }}\n'
              "max_pin_failures = 3\npin_lockout = 60.0\n")
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"

[[backend]]
name = "softhsm"
module = "{first['module']}"
env = {{ SOFTHSM2_CONF = "{first['conf']}" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
{mapped}
[[token]]
name = "mapped2"
backend = "softhsm"
select = {{ label = "mapped2" }}
{mapped}
[[token]]
name = "pt"
backend = "softhsm"
select = {{ label = "pt" }}
max_pin_failures = 3
pin_lockout = 60.0

[[rule]]
name = "root"
uid = [0]
tokens = ["*"]
role = "user"
""")
    g = Gateway(cfg)
    yield g
    stop_gateway(g, lambda: remove(sockdir))


def _signing_with_always_authenticate(gw: Gateway, token: str, pin: str
                                      ) -> tuple[RawClient, int]:
    """A logged-in session with C_SignInit done on a CKA_ALWAYS_AUTHENTICATE key."""
    c = raw(gw.path)
    (h,) = call(c, "C_OpenSession", slot_of(c, token), CKF_SERIAL | CKF_RW)
    call(c, "C_Login", h, CKU_USER, pin.encode())
    key = session_ec_key_pair(c, h, b(CKA_ALWAYS_AUTHENTICATE, True))
    call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), key)
    return c, int(h)


def _context(c: RawClient, h: int, pin: str) -> int:
    return rv(c, "C_Login", h, CKU_CONTEXT_SPECIFIC, pin.encode())


def test_mapped_context_login_takes_the_own_pin_never_the_backend_pin(gw: Gateway) -> None:
    c, h = _signing_with_always_authenticate(gw, "mapped", OWN_PIN)
    # the backend's PIN is not this client's: it gets no confirmation of it
    assert _context(c, h, BACKEND_PIN) == ckr.PIN_INCORRECT
    # its own PIN re-authenticates it, and the signature is made
    assert _context(c, h, OWN_PIN) == ckr.OK
    (sig,) = call(c, "C_Sign", h, b"\x01" * 32, 64)
    assert len(sig) == 64
    c.close()
    assert BACKEND_PIN not in gw.log() and OWN_PIN not in gw.log()


def _flood(c: RawClient, h: int, n: int) -> dict[str, Any]:
    codes = [_context(c, h, f"guess-{i:04d}") for i in range(n)]
    return {"incorrect": codes.count(ckr.PIN_INCORRECT),
            "locked": codes.count(ckr.PIN_LOCKED)}


def test_mapped_context_login_guesses_are_throttled(gw: Gateway) -> None:
    c, h = _signing_with_always_authenticate(gw, "mapped2", OWN_PIN)
    assert _flood(c, h, 12) == {"incorrect": 3, "locked": 9}
    # locked out: even the backend PIN is not tried
    assert _context(c, h, BACKEND_PIN) == ckr.PIN_LOCKED
    c.close()


def test_passthrough_context_login_guesses_never_reach_the_device(gw: Gateway) -> None:
    c, h = _signing_with_always_authenticate(gw, "pt", PT_PIN)
    assert _context(c, h, PT_PIN) == ckr.OK  # the right one still works
    call(c, "C_Sign", h, b"\x02" * 32, 64)
    call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), _key_of(c, h))
    assert _flood(c, h, 12) == {"incorrect": 3, "locked": 9}
    c.close()


def _key_of(c: RawClient, h: int) -> int:
    found = c.find(h, [b(CKA_SIGN, True)])
    assert len(found) == 1
    return int(found[0])

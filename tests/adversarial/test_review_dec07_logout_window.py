"""Review 2026-12-07: a private key used while a logout is under way outlived the login.

C_Logout takes the login away at once, then (awaiting the backend) ends the private-key
operations and drops the handles to private objects, one backend read per handle whose
privacy is not known. A C_SignInit on another session with a private key's handle,
sent meanwhile, was translated as usual (the handle was still there) but not recorded as
a private-key operation (the login was already gone), so nothing ended it: after the
logout had answered, the public session still signed with the private key. On a mapped
token the gateway keeps the backend logged in, so nothing else ended it either. Now a
handle that is not known to be public is not usable until the logout has sorted it out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_LABEL,
    CKA_TOKEN,
    CKF_RW,
    CKF_SERIAL,
    CKM_ECDSA,
    CKO_DATA,
    CKS_RW_PUBLIC,
    CKU_USER,
    b,
    call,
    pipeline,
    rv,
    s,
    send,
    session_ec_key_pair,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway
from tests.policy.tenants import raw, slot_of
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr, reply_rv
from p11gate.frontend.pins import hash_pin

OWN_PIN = "own-pin-logout"
#: objects made while logged in: the logout reads each one's CKA_PRIVATE
OBJECTS = 400


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("logoutwin")
    tok = make_token(base / "softhsm", label="mapped", pin="Backend-Pin-9", keys=False)
    (base / "backend.pin").write_text("Backend-Pin-9\n")
    (base / "backend.pin").chmod(0o600)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={base / 'gw.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
pin_mode = "mapped"
backend_pin_file = "{base / 'backend.pin'}"
pins = {{ "uid:0" = "{hash_pin(OWN_PIN.encode())}" }}

[[rule]]
name = "root"
uid = [0]
tokens = ["*"]
role = "user"
""")
    g = Gateway(cfg)
    yield g
    stop_gateway(g)


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02])
def test_a_private_key_used_during_logout_does_not_outlive_it(gw: Gateway,
                                                              delay: float) -> None:
    c = raw(gw.path)
    slot = slot_of(c, "mapped")
    (x,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
    (y,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
    call(c, "C_Login", x, CKU_USER, OWN_PIN.encode())
    made = pipeline(c, [("C_CreateObject", [x, [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, False),
                                                s(CKA_LABEL, f"d{i}")]])
                        for i in range(OBJECTS)])
    assert set(made) == {ckr.OK}
    key = session_ec_key_pair(c, x)
    logout = send(c, "C_Logout", x)
    time.sleep(delay)
    init = send(c, "C_SignInit", y, Mechanism(CKM_ECDSA, None), key)
    replies = {}
    for _ in range(2):  # in either order (matched by call code)
        frame = c.recv_frame()
        assert frame is not None
        replies[frame[0]] = reply_rv(frame[1])
    assert replies[logout[0]] == ckr.OK
    # started before the logout (then ended by it) or refused
    assert replies[init[0]] in (ckr.OK, ckr.KEY_HANDLE_INVALID, ckr.OBJECT_HANDLE_INVALID)
    assert call(c, "C_GetSessionInfo", y)[1] == CKS_RW_PUBLIC
    # logged out: whatever C_SignInit answered, no signature comes from the private key
    assert rv(c, "C_Sign", y, b"\x01" * 32, 64) == ckr.OPERATION_NOT_INITIALIZED
    assert rv(c, "C_SignInit", y, Mechanism(CKM_ECDSA, None), key) in (
        ckr.KEY_HANDLE_INVALID, ckr.OBJECT_HANDLE_INVALID)
    c.close()

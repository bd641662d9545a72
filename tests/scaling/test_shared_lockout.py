"""Issue 14, point 2 (with point 1's promise for lock-outs): the PIN failure counter and
the lock-out are one across gateway processes and nodes. Wrong PINs in raw C_Login
frames, sent at once over several connections to two gateways, are checked at most
max_pin_failures times in all; then the identity is locked out on both. Two "nodes" are
two `p11gate serve` processes with their own state directories and sockets on one
PostgreSQL store (the test starts it); two processes on one host share one SQLite file.
With the store down, a login fails closed (CKR_DEVICE_ERROR) while signing in a session
logged in before keeps working."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_LABEL,
    CKF_SERIAL,
    CKM_ECDSA,
    CKO_PRIVATE_KEY,
    CKU_USER,
    call,
    pipeline,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway
from tests.policy.tenants import raw, remove, shared_socket_dir, slot_of
from tests.postgres import Postgres
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr
from p11gate.frontend.pins import hash_pin

PIN = "node-pin-1"
MAX_FAILURES = 3


def _node(base: Path, sockdir: Path, name: str, hsm: dict[str, Any], state: str) -> Gateway:
    d = base / name
    d.mkdir()
    (d / "backend.pin").write_text("Backend-Secret-1\n")
    (d / "backend.pin").chmod(0o600)
    tokens = ""
    for label in ("locked", "steady"):
        tokens += f"""
[[token]]
name = "{label}"
backend = "softhsm"
select = {{ label = "{label}" }}
pin_mode = "mapped"
backend_pin_file = "{d / 'backend.pin'}"
pins = {{ "uid:0" = "{hash_pin(PIN.encode())}" }}
max_pin_failures = {MAX_FAILURES}
pin_lockout = 60.0
"""
    cfg = d / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / (name + '.sock')}"
state_dir = "{d / 'state'}"
log_format = "json"

{state}

[[backend]]
name = "softhsm"
module = "{hsm['module']}"
env = {{ SOFTHSM2_CONF = "{hsm['conf']}" }}
{tokens}
""")
    return Gateway(cfg)


@contextlib.contextmanager
def _gateways(base: Path, engine: str) -> Iterator[dict[str, Any]]:
    hsm = make_token(base / "softhsm", label="locked", pin="Backend-Secret-1", keys=False)
    make_token(base / "softhsm", label="steady", pin="Backend-Secret-1")
    sockdir = shared_socket_dir()
    pg: Postgres | None = None
    if engine == "postgresql":
        pg = Postgres().start()
        state = pg.state_toml()
    else:
        state = f'[state]\npath = "{base / "shared-registry.sqlite3"}"'
    gws: list[Gateway] = []
    try:
        gws = [_node(base, sockdir, n, hsm, state) for n in ("a", "b")]
        yield {"gws": gws, "pg": pg}
    finally:
        for g in gws:
            g.stop()
        if pg is not None:
            pg.close()
        remove(sockdir)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def nodes(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """postgresql: two nodes on one server; sqlite: two processes on one file."""
    with _gateways(tmp_path_factory.mktemp("lockout"), request.param) as gws:
        yield gws


@pytest.fixture(scope="module")
def pg_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with _gateways(tmp_path_factory.mktemp("storedown"), "postgresql") as gws:
        yield gws


def _wrong_logins(path: str, n: int, out: list[int], lock: threading.Lock) -> None:
    c = raw(path)
    slot = slot_of(c, "locked")
    sessions = [call(c, "C_OpenSession", slot, CKF_SERIAL)[0] for _ in range(n)]
    codes = pipeline(c, [("C_Login", [h, CKU_USER, f"wrong-{i}".encode()])
                         for i, h in enumerate(sessions)])
    c.close()
    with lock:
        out.extend(codes)


def _login(path: str, token: str, pin: str) -> int:
    c = raw(path)
    (h,) = call(c, "C_OpenSession", slot_of(c, token), CKF_SERIAL)
    code = rv(c, "C_Login", h, CKU_USER, pin.encode())
    c.close()
    return code


def test_the_limit_holds_across_processes_and_nodes(nodes: dict[str, Any]) -> None:
    gws: list[Gateway] = nodes["gws"]
    codes: list[int] = []
    lock = threading.Lock()
    # 4 connections on each gateway, 15 wrong PINs each, all in flight at once
    threads = [threading.Thread(target=_wrong_logins, args=(g.path, 15, codes, lock))
               for g in gws for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 120
    checked = codes.count(ckr.PIN_INCORRECT)
    assert 1 <= checked <= MAX_FAILURES, codes
    assert codes.count(ckr.PIN_LOCKED) == 120 - checked
    # the right PIN now: locked out on both
    assert [_login(g.path, "locked", PIN) for g in gws] == [ckr.PIN_LOCKED] * 2
    # another token's counter is its own
    assert [_login(g.path, "steady", PIN) for g in gws] == [ckr.OK] * 2


def _ec_key(c: Any, h: int) -> int:
    c.call(26, [h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")]])
    (found,) = c.call(27, [h, 4])
    c.call(28, [h])
    return int(found[0])


def test_with_the_store_down_logins_fail_closed_and_signing_goes_on(
    pg_nodes: dict[str, Any],
) -> None:
    pg: Postgres = pg_nodes["pg"]
    gw: Gateway = pg_nodes["gws"][0]
    c = raw(gw.path)
    (h,) = call(c, "C_OpenSession", slot_of(c, "steady"), CKF_SERIAL)
    assert rv(c, "C_Login", h, CKU_USER, PIN.encode()) in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    key = _ec_key(c, h)
    pg.stop()
    try:
        assert _login(gw.path, "steady", "another-wrong-pin") == ckr.DEVICE_ERROR
        for _ in range(3):  # a call that does not need the store keeps working
            call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), key)
            (sig,) = call(c, "C_Sign", h, b"\x05" * 32, 64)
            assert len(sig) == 64
        assert gw.alive()
        assert pg.password not in gw.log()
    finally:
        pg.restart()
    c.close()

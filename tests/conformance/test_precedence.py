"""Error precedence (issue 15 point 6) against a hostile client: a key handle the
gateway cannot translate gets the module's handle-independent refusal (function not
supported, mechanism invalid, no operation active), but the handle itself — another
tenant's, the backend's own numbers, or a guessed one — never reaches the module: the
module sees only CK_INVALID_HANDLE (0) in its place, and a cached answer is not asked
again."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import Gateway, RawClient, rv_of, wait_for, write_config
from tests.policy.tenants import as_uid, remove, shared_socket_dir
from tests.softhsm import make_token, requires_softhsm

from p11gate.codec import V026, Attribute, Mechanism, ckr
from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.codec.values import Ecdh1Params

pytestmark = requires_softhsm

SHIM = Path(__file__).with_name("recording_module.py")
ID = {n: c.id for n, c in CALLS_BY_NAME.items()}
RSA, ECDSA = Mechanism(0x1, None), Mechanism(0x1041, None)
BOGUS = Mechanism(0x8FFF0001, None)


TENANT = 1002  # another uid, confined to the objects it made (sees none of root's)


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    token = make_token(tmp_path / "hsm")
    record = tmp_path / "handles.txt"
    record.touch()
    sockdir = shared_socket_dir()
    extra = f'worker_command = ["{sys.executable}", "{SHIM}", "{record}", "{token["module"]}"]'
    cfg = write_config(tmp_path, token, extra_backend=extra)
    text = cfg.read_text().replace(
        f'listen = "unix:path={tmp_path / "p11gate.sock"}"',
        f'listen = "unix:path={sockdir / "gw.sock"}"\nsocket_mode = 0o666')
    assert "socket_mode" in text
    cfg.write_text(text + f"""
[[rule]]
name = "owner"
uid = [0]
tokens = ["signing"]
role = "officer"

[[rule]]
name = "tenant"
uid = [{TENANT}]
tokens = ["signing"]
role = "user"
namespace = {{ owned = true }}
""")
    gw = Gateway(cfg)
    yield gw, record
    alive = gw.alive()
    rc = gw.stop()
    remove(sockdir)
    assert alive and rc == 0, gw.log()[-3000:]


def client(gw: Gateway) -> tuple[RawClient, int]:
    return client_at(gw.path)


def client_at(path: str) -> tuple[RawClient, int]:
    c = RawClient(path, version=2, dialect=V026)
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
    assert used and used[-1][0] == ID["C_SignInit"] and used[-1][2] != 0
    backend_handles = {h for ln in used for h in ln[2:]}

    # the tenant logs in (it may use keys: only root's handles are foreign to it) and
    # finds none of root's objects; then let the gateway's own identity reads of
    # what root found settle before counting what reaches the module
    hostile = sorted({*keys_a, *backend_handles, *range(1, 40), 0x7777})
    assert wait_for(lambda: _settled(record), timeout=5)
    before = len(lines(record))
    got = as_uid(TENANT, _hostile, gw.path, hostile)
    assert got["mine"] == []
    want = {
        # handle-independent refusals of the module come first ...
        "sign_recover_init": ckr.FUNCTION_NOT_SUPPORTED,
        "verify_recover_init": ckr.FUNCTION_NOT_SUPPORTED,
        "digest_key": ckr.OPERATION_NOT_INITIALIZED,
        # ... else the code for the argument's role
        "sign_init": ckr.KEY_HANDLE_INVALID,
        "sign_init_bogus_mechanism": ckr.KEY_HANDLE_INVALID,
        "wrap_key": ckr.WRAPPING_KEY_HANDLE_INVALID,
        "derive_key": ckr.KEY_HANDLE_INVALID,
        "get_attribute_value": ckr.OBJECT_HANDLE_INVALID,
        "digest_key_in_digest": ckr.KEY_HANDLE_INVALID,
    }
    for what, rv in want.items():
        assert got[what] == [rv] * len(hostile), (what, got[what])
    seen = lines(record)[before:]
    # the tenant's session: where the module got CK_INVALID_HANDLE in place of its keys
    probe_sessions = {ln[1] for ln in seen if ln[0] == ID["C_SignRecoverInit"]}
    assert len(probe_sessions) == 1, seen
    first = next(i for i, ln in enumerate(seen) if ln[0] == ID["C_SignRecoverInit"])
    probes = [ln for ln in seen[first:] if ln[1] in probe_sessions]
    # from the first hostile call on, the module saw on the tenant's session only
    # CK_INVALID_HANDLE, never a number the tenant chose
    assert all(h == 0 for ln in probes for h in ln[2:]), probes
    # everything else is the gateway's own reading of objects the module itself found
    # (the tenant's find, checked against its namespace; identities on the control
    # session)
    assert all(ln[0] == ID["C_GetAttributeValue"] for ln in seen if ln not in probes), seen
    by_call: dict[int, int] = {}
    for ln in probes:
        by_call[ln[0]] = by_call.get(ln[0], 0) + 1
    # CKR_FUNCTION_NOT_SUPPORTED is cached per (backend, call, mechanism): asked once
    assert by_call.get(ID["C_SignRecoverInit"]) == 1, by_call
    assert by_call.get(ID["C_VerifyRecoverInit"]) == 1, by_call
    # answers that depend on the session or the handle are asked each time
    assert by_call.get(ID["C_DigestKey"]) == 2 * len(hostile), by_call
    # a's operation and keys are untouched
    (sig,) = a.call(ID["C_Sign"], [sa, b"\x01" * 32, 64])
    assert len(sig) == 64
    a.close()


def _hostile(path: str, hostile: list[int]) -> dict[str, list[int]]:
    """As the tenant: every key and object call with each of ``hostile``'s handles."""
    b, sb = client_at(path)
    b.call(ID["C_Login"], [sb, 1, b"1234"])
    out: dict[str, list[int]] = {"mine": b.find(sb, [])}
    ecdh = Mechanism(0x1050, Ecdh1Params(1, None, b"\x04" + b"\x01" * 64))
    secret = [Attribute(0, 4, 8), Attribute(0x100, 0x10, 8)]
    calls: dict[str, Any] = {
        "sign_recover_init": lambda h: ("C_SignRecoverInit", [sb, RSA, h]),
        "verify_recover_init": lambda h: ("C_VerifyRecoverInit", [sb, RSA, h]),
        "digest_key": lambda h: ("C_DigestKey", [sb, h]),
        "sign_init": lambda h: ("C_SignInit", [sb, ECDSA, h]),
        "sign_init_bogus_mechanism": lambda h: ("C_SignInit", [sb, BOGUS, h]),
        "wrap_key": lambda h: ("C_WrapKey", [sb, Mechanism(0x2109, None), h, h, 64]),
        "derive_key": lambda h: ("C_DeriveKey", [sb, ecdh, h, secret]),
        "get_attribute_value": lambda h: ("C_GetAttributeValue", [sb, h, []]),
    }
    for what, make in calls.items():
        out[what] = []
        for h in hostile:
            name, args = make(h)
            out[what].append(rv_of(b, ID[name], args))
    b.call(ID["C_DigestInit"], [sb, Mechanism(0x250, None)])  # CKM_SHA256
    out["digest_key_in_digest"] = [rv_of(b, ID["C_DigestKey"], [sb, h]) for h in hostile]
    b.close()
    return out


def test_a_valid_handle_still_reaches_the_module(recorded: tuple[Gateway, Path]) -> None:
    """The precedence path is only for handles that do not translate."""
    gw, record = recorded
    a, sa = client(gw)
    a.call(ID["C_Login"], [sa, 1, b"1234"])
    (rsa_key,) = a.find(sa, [Attribute(0, 3, 8), Attribute(0x102, b"\x02", 1)])
    assert rv_of(a, ID["C_SignRecoverInit"], [sa, RSA, rsa_key]) == ckr.FUNCTION_NOT_SUPPORTED
    last: list[Any] = lines(record)[-1]
    assert last[0] == ID["C_SignRecoverInit"] and last[2] != 0
    a.close()

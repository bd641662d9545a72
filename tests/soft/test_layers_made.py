"""Tokens made by clients: an identity offered an uninitialised token (client_tokens)
makes one of its own with C_InitToken (pkcs11-tool through p11-kit-client.so); it
appears in a new slot for that identity only (raw frames of another uid get
CKR_SLOT_ID_INVALID), keeps its objects over a restart, and the count is bounded."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor  # before the fork: see test_layers
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import CLIENT_MODULE, Gateway, rv_of
from tests.policy.tenants import (
    CKF_RW,
    CKF_SERIAL,
    C_GetSlotList,
    C_GetTokenInfo,
    C_InitToken,
    C_OpenSession,
    as_uid,
    raw,
    remove,
    shared_socket_dir,
    slot_of,
    tool_as,
)

from p11gate.codec import ckr

pytestmark = pytest.mark.skipif(
    not Path(CLIENT_MODULE).exists() or os.geteuid() != 0
    or shutil.which("pkcs11-tool") is None,
    reason="needs p11-kit-client.so, pkcs11-tool and root (to be other uids)")

A, B = 1031, 1032
C_GetSlotInfo = 5
CKF_TOKEN_INITIALIZED, CKF_PROTECTED_AUTHENTICATION_PATH = 0x400, 0x100


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("made")
    for name, pin in (("so.pin", "layer-so-pin-2"), ("user.pin", "layer-user-pin-2")):
        (base / name).write_text(pin + "\n")
        (base / name).chmod(0o600)
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"

[[backend]]
name = "mine"
type = "soft"
init_so_pin_file = "{base / 'so.pin'}"
init_user_pin_file = "{base / 'user.pin'}"
own_layer_dir = "{base / 'own'}"

[[token]]
name = "blank"
backend = "mine"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
client_tokens = 2

[[rule]]
name = "members"
uid = [{A}, {B}]
tokens = ["blank"]
""")
    gw = Gateway(cfg)
    env = {"gw": gw, "base": base, "path": gw.path}
    try:
        yield env
    finally:
        env["gw"].stop()  # the one running now: a test restarts it
        remove(sockdir)


def _tokens(path: str) -> dict[str, Any]:
    """label → (slot, flags, serial) of every slot this uid sees."""
    c = raw(path)
    (slots,) = c.call(C_GetSlotList, [1, 16])
    out = {}
    for s in slots:
        info = c.call(C_GetTokenInfo, [s])
        out[info[0].rstrip(b" ").decode()] = (int(s), int(info[4]),
                                              info[3].rstrip(b" ").decode())
    c.close()
    return out


def _probe(path: str, slot: int) -> dict[str, int]:
    """Raw frames naming another identity's slot."""
    c = raw(path)
    out = {"slot_info": rv_of(c, C_GetSlotInfo, [slot]),
           "token_info": rv_of(c, C_GetTokenInfo, [slot]),
           "open": rv_of(c, C_OpenSession, [slot, CKF_RW | CKF_SERIAL]),
           "init": rv_of(c, C_InitToken, [slot, b"whatever", b"stolen".ljust(32)])}
    c.close()
    return out


def _init_raw(path: str, label: str) -> int:
    c = raw(path)
    rv = rv_of(c, C_InitToken, [slot_of(c, "blank"), None, label.encode().ljust(32)])
    c.close()
    return rv


def test_the_offered_token_is_uninitialised(env: dict[str, Any]) -> None:
    toks = as_uid(A, _tokens, env["path"])
    assert list(toks) == ["blank"]
    assert not toks["blank"][1] & CKF_TOKEN_INITIALIZED
    assert toks["blank"][1] & CKF_PROTECTED_AUTHENTICATION_PATH


def test_init_token_makes_a_token_in_a_new_slot(env: dict[str, Any]) -> None:
    r = tool_as(A, env["gw"], "--token-label", "blank", "--init-token", "--label", "a-made",
                "--so-pin", "ignored")
    assert r.returncode == 0, r.stderr + r.stdout
    toks = as_uid(A, _tokens, env["path"])
    assert sorted(toks) == ["a-made", "blank"]
    slot, flags, serial = toks["a-made"]
    assert slot != toks["blank"][0]
    assert flags & CKF_TOKEN_INITIALIZED
    assert re.fullmatch(r"[0-9a-f]{16}", serial)
    # it is a working token: an object made in it is found there, not in the offer
    r = tool_as(A, env["gw"], "--token-label", "a-made", "--login", "--pin", "",
                "--write-object", "/etc/hostname", "--type", "data", "--label", "a-data")
    assert r.returncode == 0, r.stderr + r.stdout
    r = tool_as(A, env["gw"], "--token-label", "a-made", "--login", "--pin", "",
                "--list-objects")
    assert "a-data" in r.stdout, r.stdout
    index = list((env["base"] / "own" / "made").glob("*.json"))
    assert len(index) == 1 and serial in index[0].read_text()  # 24 digits on file


def test_another_identity_never_sees_the_slot(env: dict[str, Any]) -> None:
    slot = as_uid(A, _tokens, env["path"])["a-made"][0]
    assert list(as_uid(B, _tokens, env["path"])) == ["blank"]
    assert as_uid(B, _probe, env["path"], slot) == {
        "slot_info": ckr.SLOT_ID_INVALID, "token_info": ckr.SLOT_ID_INVALID,
        "open": ckr.SLOT_ID_INVALID, "init": ckr.SLOT_ID_INVALID}


def test_the_number_of_tokens_is_bounded(env: dict[str, Any]) -> None:
    assert as_uid(A, _init_raw, env["path"], "a-second") == ckr.OK
    assert as_uid(A, _init_raw, env["path"], "a-third") == ckr.DEVICE_MEMORY
    assert sorted(as_uid(A, _tokens, env["path"])) == ["a-made", "a-second", "blank"]
    assert as_uid(B, _init_raw, env["path"], "b-first") == ckr.OK  # B's own count
    assert sorted(as_uid(B, _tokens, env["path"])) == ["b-first", "blank"]


def _init_twice_at_once(path: str) -> list[int]:
    with ThreadPoolExecutor(2) as pool:
        return sorted(pool.map(lambda n: _init_raw(path, f"b-race-{n}"), range(2)))


def test_two_inits_at_once_do_not_pass_the_bound(env: dict[str, Any]) -> None:
    # B has one of its two: of two made at the same time, one is refused
    assert as_uid(B, _init_twice_at_once, env["path"]) == [ckr.OK, ckr.DEVICE_MEMORY]
    assert len(as_uid(B, _tokens, env["path"])) == 3


def test_made_tokens_survive_a_restart(env: dict[str, Any]) -> None:
    before = as_uid(A, _tokens, env["path"])
    env["gw"].stop()
    env["gw"] = Gateway(env["base"] / "p11gate.toml")
    assert as_uid(A, _tokens, env["path"]) == before
    r = tool_as(A, env["gw"], "--token-label", "a-made", "--login", "--pin", "",
                "--list-objects")
    assert "a-data" in r.stdout, r.stdout

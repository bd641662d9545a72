"""C_InitToken through the gateway (issue 15 point 3): the gateway closes its own backend
sessions on the token, initializes it and opens them again; refused with
CKR_SESSION_EXISTS only while some client (any connection) has a session there; the
token's objects and every connection's handles to them are gone afterwards; C_InitPIN
and C_SetPIN work. Pool tokens refuse it (CKR_FUNCTION_NOT_SUPPORTED). The first two
tests run on SoftHSM and again on the built-in soft token."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, rv_of, write_config
from tests.pools.members import make_member, pool_config
from tests.soft_token import make_soft_token
from tests.softhsm import make_token, requires_softhsm

from p11gate.codec import Attribute, ckr
from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.policy.namespace import OwnershipStore
from p11gate.registry import Registry

pytestmark = requires_softhsm

ID = {n: c.id for n, c in CALLS_BY_NAME.items()}
CKU_SO, CKU_USER = 0, 1
RW, RO = 6, 4
CKF_USER_PIN_INITIALIZED = 0x8


def connect(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path)
    c.initialize()
    (slots,) = c.call(ID["C_GetSlotList"], [1, 8])
    return c, slots[0]


def token_flags(c: RawClient, slot: int) -> int:
    return int(c.call(ID["C_GetTokenInfo"], [slot])[4])


@pytest.mark.parametrize("isolation", ["process", "none", "soft"])
def test_init_token_through_the_gateway(tmp_path: Path, isolation: str) -> None:
    token = make_soft_token(tmp_path / "soft") if isolation == "soft" else \
        make_token(tmp_path / "hsm")
    label = token["label"].encode().ljust(32)
    so = token["so_pin"].encode()
    gw = Gateway(write_config(tmp_path, token, isolation=isolation))
    try:
        a, slot = connect(gw)
        b, _ = connect(gw)
        (sa,) = a.call(ID["C_OpenSession"], [slot, RW])
        a.call(ID["C_Login"], [sa, CKU_USER, b"1234"])
        keys = a.find(sa, [Attribute(0, 3, 8)])
        assert len(keys) == 2
        # another connection's session on the token: refused, nothing changed
        assert rv_of(b, ID["C_InitToken"], [slot, so, label]) == ckr.SESSION_EXISTS
        assert len(a.find(sa, [])) == 4
        # and the caller's own
        (sb,) = b.call(ID["C_OpenSession"], [slot, RO])
        a.call(ID["C_CloseSession"], [sa])
        assert rv_of(b, ID["C_InitToken"], [slot, so, label]) == ckr.SESSION_EXISTS
        b.call(ID["C_CloseSession"], [sb])
        # no client session anywhere: the gateway's own sessions do not stand in the way
        assert rv_of(b, ID["C_InitToken"], [slot, b"0000", label]) == ckr.PIN_INCORRECT
        assert rv_of(b, ID["C_InitToken"], [slot, so, label]) == ckr.OK
        assert not token_flags(b, slot) & CKF_USER_PIN_INITIALIZED
        # the objects are gone for everyone, and so are the handles to them
        (sa,) = a.call(ID["C_OpenSession"], [slot, RW])
        assert rv_of(a, ID["C_GetAttributeValue"], [sa, keys[0], []]) == \
            ckr.OBJECT_HANDLE_INVALID
        assert rv_of(a, ID["C_SignInit"], [sa, (0x1041, None), keys[0]]) in (
            ckr.KEY_HANDLE_INVALID, ckr.USER_NOT_LOGGED_IN)
        assert a.find(sa, []) == []
        assert rv_of(a, ID["C_Login"], [sa, CKU_USER, b"1234"]) == ckr.USER_PIN_NOT_INITIALIZED
        a.call(ID["C_CloseSession"], [sa])
        # the SO sets the user PIN, the user changes it
        (sb,) = b.call(ID["C_OpenSession"], [slot, RW])
        b.call(ID["C_Login"], [sb, CKU_SO, so])
        b.call(ID["C_InitPIN"], [sb, b"4321"])
        b.call(ID["C_Logout"], [sb])
        assert token_flags(b, slot) & CKF_USER_PIN_INITIALIZED
        assert rv_of(b, ID["C_Login"], [sb, CKU_USER, b"1234"]) == ckr.PIN_INCORRECT
        b.call(ID["C_Login"], [sb, CKU_USER, b"4321"])
        b.call(ID["C_SetPIN"], [sb, b"4321", b"111111"])
        b.call(ID["C_Logout"], [sb])
        b.call(ID["C_Login"], [sb, CKU_USER, b"111111"])
        assert b.find(sb, []) == []
        (rnd,) = b.call(ID["C_GenerateRandom"], [sb, 16])
        assert len(rnd) == 16
        a.close()
        b.close()
    finally:
        alive = gw.alive()
        rc = gw.stop()
    assert alive and rc == 0, gw.log()[-3000:]


def tool(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args],
                          env=gw.client_env(), capture_output=True, text=True, timeout=120)


def _objects_in_token(token: dict, pin: str) -> str:
    """The token's objects as its own module (SoftHSM) or its file (soft) has them,
    not as the gateway says."""
    if token.get("type") == "soft":
        import asyncio

        from p11gate.backends.soft.store import SoftStore
        from p11gate.backends.soft.token import SoftToken

        t = SoftToken(SoftStore(token["path"]))
        try:
            (s,) = t.open_session([1, RW])
            asyncio.run(t.login_call([s, CKU_USER, pin.encode()]))
            return " ".join(str(o.attrs.get(3, b"")) for o in t.objects.values())
        finally:
            t.store.close()
    listed = subprocess.run(["pkcs11-tool", "--module", token["module"], "-O", "--login",
                             "--pin", pin, "--token-label", token["label"]],
                            env=token["env"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


@pytest.mark.parametrize("kind", ["softhsm", "soft"])
def test_pkcs11_tool_init_token_through_p11_kit_client(tmp_path: Path, kind: str) -> None:
    token = make_soft_token(tmp_path / "soft") if kind == "soft" else \
        make_token(tmp_path / "hsm")
    gw = Gateway(write_config(tmp_path, token))
    try:
        before = tool(gw, "-O", "--login", "--pin", "1234")
        assert before.returncode == 0 and "ec1" in before.stdout, before.stdout + before.stderr
        r = tool(gw, "--init-token", "--label", token["label"], "--so-pin", token["so_pin"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "successfully initialized" in r.stdout + r.stderr
        r = tool(gw, "--init-pin", "--login", "--login-type", "so", "--so-pin",
                 token["so_pin"], "--new-pin", "2468")
        assert r.returncode == 0, r.stdout + r.stderr
        r = tool(gw, "--change-pin", "--pin", "2468", "--new-pin", "97531")
        assert r.returncode == 0, r.stdout + r.stderr
        assert tool(gw, "-O", "--login", "--pin", "2468").returncode != 0
        after = tool(gw, "-O", "--login", "--pin", "97531")
        assert after.returncode == 0, after.stdout + after.stderr
        assert "ec1" not in after.stdout and "rsa1" not in after.stdout, after.stdout
        # the token really was initialized on the module (the file), not only in the
        # gateway (a second process on a soft file is fine: WAL)
        listed = _objects_in_token(token, "97531")
        assert "ec1" not in listed and "rsa1" not in listed, listed
    finally:
        alive = gw.alive()
        rc = gw.stop()
    assert alive and rc == 0, gw.log()[-3000:]


def test_pool_token_refuses_init_token(tmp_path: Path) -> None:
    members = [make_member(tmp_path, i, None) for i in range(2)]
    gw = Gateway(pool_config(tmp_path, members))
    try:
        c, slot = connect(gw)
        assert rv_of(c, ID["C_InitToken"], [slot, b"5678", b"member0".ljust(32)]) == \
            ckr.FUNCTION_NOT_SUPPORTED
        (s,) = c.call(ID["C_OpenSession"], [slot, RW])
        (rnd,) = c.call(ID["C_GenerateRandom"], [s, 8])
        assert len(rnd) == 8
        c.close()
    finally:
        alive = gw.alive()
        rc = gw.stop()
    assert alive and rc == 0, gw.log()[-3000:]


def test_gateway_login_token_refuses_init_token(tmp_path: Path) -> None:
    """pin_mode none: the gateway logs the backend in with a stored user PIN a fresh
    token would not have, so it refuses rather than leave the token unusable."""
    token = make_token(tmp_path / "hsm", keys=False)
    cfg = write_config(tmp_path, token)
    pin_file = tmp_path / "backend.pin"
    pin_file.write_text("1234")
    pin_file.chmod(0o600)
    cfg.write_text(cfg.read_text() + f'pin_mode = "none"\nbackend_pin_file = "{pin_file}"\n')
    gw = Gateway(cfg)
    try:
        c, slot = connect(gw)
        assert rv_of(c, ID["C_InitToken"], [slot, token["so_pin"].encode(),
                                            token["label"].encode().ljust(32)]) == \
            ckr.FUNCTION_NOT_SUPPORTED
        (s,) = c.call(ID["C_OpenSession"], [slot, RW])
        c.call(ID["C_Login"], [s, CKU_USER, b""])  # identity suffices: still served
        c.close()
    finally:
        alive = gw.alive()
        rc = gw.stop()
    assert alive and rc == 0, gw.log()[-3000:]


def test_ownership_of_an_initialized_token_is_forgotten(tmp_path: Path) -> None:
    """After C_InitToken the gateway forgets who owned the token's objects (else a new
    object with an old identity would count as another tenant's)."""
    store = OwnershipStore(Registry(tmp_path))
    store.claim("signing", (3, b"\x01", b"ec1"), "uid:1000")
    store.claim("signing", (2, b"\x01", b"ec1"), "uid:1000")
    store.claim("other", (3, b"\x01", b"ec1"), "uid:1001")
    assert store.release_token("signing") == 2
    assert store.owner("signing", (3, b"\x01", b"ec1")) is None
    assert store.owner("other", (3, b"\x01", b"ec1")) == "uid:1001"
    # and in the registry, not only in memory
    again = OwnershipStore(Registry(tmp_path))
    assert again.count("signing") == 0 and again.count("other") == 1

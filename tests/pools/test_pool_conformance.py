"""Issue 15, points 7-15: a pool token behaves as the module behind it.

Raw RPC frames (no p11-kit-client.so and its own checks); where it helps, the same calls
on a plain (non-pool) gateway token of the same gateway give the expected answer.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_EXTRACTABLE,
    CKA_ID,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_SENSITIVE,
    CKA_SIGN,
    CKA_TOKEN,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKK_AES,
    CKM_AES_KEY_GEN,
    CKM_ECDSA,
    CKM_SHA256,
    CKO_DATA,
    CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY,
    CKO_SECRET_KEY,
    b,
    call,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway, RawClient
from tests.pools.members import PIN, key_material, make_member, pool_config

from p11gate.admin import query
from p11gate.codec import Attribute, AttrRequest, Mechanism, ckr

CKU_USER, CKU_CONTEXT_SPECIFIC = 1, 2
CKF_RO, CKF_RW = 4, 6
CKA_ALWAYS_AUTHENTICATE, CKA_EC_PARAMS, CKA_KEY_TYPE_EC = 0x202, 0x180, 3
CKM_EC_KEY_PAIR_GEN, CKM_AES_ECB, CKM_AES_CBC_PAD = 0x1040, 0x1081, 0x1085
P256 = bytes.fromhex("06082a8648ce3d030107")


def _plain_token(base: Path, conf: Path, member: dict[str, Any]) -> None:
    """Add a plain token (one more SoftHSM token, same keys) to a pool configuration."""
    conf.write_text(conf.read_text() + f"""
[[backend]]
name = "plain"
module = "{member['module']}"
call_timeout = 5.0
env = {{ SOFTHSM2_CONF = "{member['conf']}" }}

[[token]]
name = "plain-token"
backend = "plain"
""")


class Env:
    def __init__(self, base: Path, gw: Gateway) -> None:
        self.base, self.gw = base, gw

    def client(self) -> RawClient:
        c = RawClient(self.gw.path, timeout=30)
        c.initialize()
        return c

    def slot(self, c: RawClient, label: str) -> int:
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        for sl in slots:
            info = call(c, "C_GetTokenInfo", sl)
            if bytes(info[0]).rstrip(b" \0").decode() == label:
                return int(sl)
        raise AssertionError(f"no token {label}")

    def session(self, c: RawClient, label: str = "ha-token", flags: int = CKF_RW,
                login: bool = True) -> int:
        (h,) = call(c, "C_OpenSession", self.slot(c, label), flags)
        if login:
            r = rv(c, "C_Login", h, CKU_USER, PIN.encode())
            assert r in (0, ckr.USER_ALREADY_LOGGED_IN), ckr.name(r)
        return int(h)

    def members(self) -> list[dict[str, Any]]:
        return list(query(str(self.base / "state" / "admin.sock"))["pools"][0]["members"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("conf")
    keys = key_material(base / "keys", rsa_key=False)
    members = [make_member(base, i, keys) for i in range(3)]
    conf = pool_config(base, members[:2], max_sessions=4)
    _plain_token(base, conf, members[2])
    gw = Gateway(conf)
    try:
        yield Env(base, gw)
    finally:
        gw.stop()


def data_obj(label: str, token: bool = False) -> list[Attribute]:
    return [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, token), s(CKA_LABEL, label),
            s(CKA_VALUE, b"v-" + label.encode())]


def aes(label: str, *, token: bool = False, value: bytes = bytes(range(16)),
        sensitive: bool = False, extractable: bool = True) -> list[Attribute]:
    return [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, token),
            s(CKA_LABEL, label), s(CKA_VALUE, value), b(CKA_SENSITIVE, sensitive),
            b(CKA_EXTRACTABLE, extractable), b(0x104, True), b(0x105, True),
            b(0x106, True), b(0x107, True)]


def find(c: RawClient, h: int, template: list[Attribute]) -> list[int]:
    return c.find(h, template, 256)


def labels(c: RawClient, h: int, handles: list[int]) -> list[str]:
    out = []
    for o in handles:
        (attrs, _) = call(c, "C_GetAttributeValue", h, o, [AttrRequest(CKA_LABEL, 64)])
        out.append(bytes(attrs[0].value).decode())
    return sorted(out)


# ---------------------------------------------------------------- 7, 11: session objects

def test_session_objects_die_with_their_session_and_stay_with_their_application(
    env: Env,
) -> None:
    a, other = env.client(), env.client()
    try:
        h1 = env.session(a)
        h2 = env.session(a)
        for lab in ("p7-x", "p7-y", "p7-z"):
            call(a, "C_CreateObject", h1, data_obj(lab))
        tmpl = [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, False)]
        # visible to the application's other sessions, to no other application
        assert labels(a, h2, find(a, h2, tmpl)) == ["p7-x", "p7-y", "p7-z"]
        ho = env.session(other)
        assert find(other, ho, tmpl) == []
        call(a, "C_CloseSession", h1)
        # gone with the session that made them, for the application's later sessions too
        assert find(a, h2, tmpl) == []
        h3 = env.session(a)
        assert find(a, h3, tmpl) == []
        # and with the connection
        call(other, "C_CreateObject", ho, data_obj("p7-conn"))
        other.close()
        other = env.client()
        ho = env.session(other)
        assert find(other, ho, tmpl) == []
    finally:
        a.close()
        other.close()


def test_a_find_over_session_objects_returns_what_the_module_returns(env: Env) -> None:
    """Point 11: a template matching part of the session's objects lists exactly those,
    as the plain token does (none of another session's, none that do not match)."""
    results = {}
    for label in ("ha-token", "plain-token"):
        a, other = env.client(), env.client()
        try:
            h = env.session(a, label)
            ho = env.session(other, label)
            for lab in ("p11-a", "p11-b", "p11-c"):
                call(a, "C_CreateObject", h, data_obj(lab))
            call(a, "C_CreateObject", h, aes("p11-b"))
            call(other, "C_CreateObject", ho, data_obj("p11-b"))
            got = []
            for tmpl in ([u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, False), s(CKA_LABEL, "p11-b")],
                         [s(CKA_LABEL, "p11-b")],
                         [b(CKA_TOKEN, False), u(CKA_CLASS, CKO_SECRET_KEY)],
                         [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, False)]):
                got.append(labels(a, h, find(a, h, tmpl)))
            # a later session of the same application: the closed session's are gone
            call(a, "C_CloseSession", h)
            h = env.session(a, label)
            got.append(labels(a, h, find(a, h, [s(CKA_LABEL, "p11-b")])))
            results[label] = got
        finally:
            a.close()
            other.close()
    assert results["ha-token"] == results["plain-token"], results
    assert results["ha-token"][0] == ["p11-b"]


# ---------------------------------------------------------------- 12: pinned to a member

def test_a_session_key_works_with_digest_key_and_two_member_calls_are_refused(
    env: Env,
) -> None:
    c = env.client()
    try:
        value = bytes(range(32))
        for i in range(6):
            h = env.session(c)
            (k,) = call(c, "C_CreateObject", h, aes(f"p12-{i}", value=value))
            # by its own session, and by sessions of the application that hold none
            for hs in (h, *(env.session(c) for _ in range(4))):
                call(c, "C_DigestInit", hs, Mechanism(CKM_SHA256, None))
                call(c, "C_DigestUpdate", hs, b"x")
                call(c, "C_DigestKey", hs, k)
                (d,) = call(c, "C_DigestFinal", hs, 64)
                assert bytes(d) == hashlib.sha256(b"x" + value).digest()
        # keys of several sessions: on one member or refused with one documented code
        keys = []
        for i in range(12):
            h = env.session(c)
            (k,) = call(c, "C_CreateObject", h, aes(f"p12-w{i}", value=value))
            keys.append((h, k))
        codes = {rv(c, "C_WrapKey", h, Mechanism(0x2109, None), keys[0][1], k, 256)
                 for h, k in keys[1:]}
        assert codes <= {0, ckr.KEY_HANDLE_INVALID}, [ckr.name(x) for x in codes]
    finally:
        c.close()


# ---------------------------------------------------------------- 9: member sessions clean

def test_an_error_never_leaves_an_operation_on_a_member_session(env: Env) -> None:
    c = env.client()
    try:
        h = env.session(c)
        (k,) = find(c, h, [u(CKA_CLASS, CKO_PUBLIC_KEY), s(CKA_LABEL, "ec1")])
        plain = env.session(c, "plain-token")
        (pk,) = find(c, plain, [u(CKA_CLASS, CKO_PUBLIC_KEY), s(CKA_LABEL, "ec1")])
        call(c, "C_DigestInit", plain, Mechanism(CKM_SHA256, None))
        want = rv(c, "C_DigestKey", plain, pk)
        assert want == ckr.KEY_INDIGESTIBLE
        for _ in range(8):  # every member session of both members
            hs = env.session(c)
            call(c, "C_DigestInit", hs, Mechanism(CKM_SHA256, None))
            assert rv(c, "C_DigestKey", hs, k) in (want, ckr.KEY_HANDLE_INVALID)
            # PKCS#11: the error ended the operation
            assert rv(c, "C_DigestFinal", hs, 64) == ckr.OPERATION_NOT_INITIALIZED
        (ec,) = find(c, h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
        bad = []
        for _ in range(24):
            hs = env.session(c)
            for name, args in (("C_DigestInit", [Mechanism(CKM_SHA256, None)]),
                               ("C_DigestFinal", [64]),
                               ("C_SignInit", [Mechanism(CKM_ECDSA, None), ec]),
                               ("C_Sign", [bytes(32), 128])):
                r = rv(c, name, hs, *args)
                if r:
                    bad.append((name, ckr.name(r)))
            call(c, "C_CloseSession", hs)
        assert bad == []
    finally:
        c.close()


# ---------------------------------------------------------------- 10: context login

def test_context_specific_login_reaches_the_operation(env: Env) -> None:
    c = env.client()
    try:
        out = {}
        for label in ("plain-token", "ha-token"):
            h = env.session(c, label)
            pub = [u(CKA_CLASS, CKO_PUBLIC_KEY), s(CKA_EC_PARAMS, P256), b(CKA_TOKEN, False),
                   s(CKA_LABEL, "p10")]
            priv = [u(CKA_CLASS, CKO_PRIVATE_KEY), b(CKA_TOKEN, False), b(CKA_SIGN, True),
                    b(CKA_ALWAYS_AUTHENTICATE, True), s(CKA_LABEL, "p10")]
            _, k = call(c, "C_GenerateKeyPair", h, Mechanism(CKM_EC_KEY_PAIR_GEN, None),
                        pub, priv)
            steps = []
            call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), k)
            steps.append(rv(c, "C_Sign", h, bytes(32), 128))  # not yet authenticated
            call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), k)
            steps.append(rv(c, "C_Login", h, CKU_CONTEXT_SPECIFIC, PIN.encode()))
            (sig,) = call(c, "C_Sign", h, bytes(32), 128)
            steps.append(len(sig))
            out[label] = steps
        assert out["ha-token"] == out["plain-token"] == [ckr.USER_NOT_LOGGED_IN, 0, 64], out
    finally:
        c.close()


# ---------------------------------------------------------------- 13: argument checks

def test_calls_the_pool_answers_itself_check_arguments_like_the_module(env: Env) -> None:
    c = env.client()
    try:
        out = {}
        for label in ("plain-token", "ha-token"):
            h = env.session(c, label)
            codes = [rv(c, "C_FindObjects", h, 4), rv(c, "C_FindObjects", h, 0)]  # none active
            call(c, "C_FindObjectsInit", h, [u(CKA_CLASS, CKO_PUBLIC_KEY)])
            codes.append(rv(c, "C_FindObjectsInit", h, [u(CKA_CLASS, CKO_PUBLIC_KEY)]))
            codes.append(rv(c, "C_FindObjects", h, 0))
            codes.append(rv(c, "C_FindObjects", h, 4))
            codes.append(rv(c, "C_FindObjectsFinal", h))
            codes.append(rv(c, "C_FindObjectsFinal", h))
            out[label] = [ckr.name(x) for x in codes]
        assert out["ha-token"] == out["plain-token"], out
    finally:
        c.close()


# ---------------------------------------------------------------- 15: read-only sessions

def test_read_only_sessions_cannot_write_through_a_pool(env: Env) -> None:
    c = env.client()
    try:
        out = {}
        for label in ("plain-token", "ha-token"):
            rw = env.session(c, label)
            (tok,) = call(c, "C_CreateObject", rw, data_obj(f"p15-{label}", token=True))
            ro = env.session(c, label, CKF_RO)
            (sess_obj,) = call(c, "C_CreateObject", ro, data_obj("p15-s"))  # allowed
            gen = Mechanism(CKM_AES_KEY_GEN, None)
            codes = {
                "create-token": rv(c, "C_CreateObject", ro, data_obj("p15-t", token=True)),
                "set-token": rv(c, "C_SetAttributeValue", ro, tok, [s(CKA_ID, b"\x09")]),
                "copy-token": rv(c, "C_CopyObject", ro, tok, [s(CKA_LABEL, "p15-c")]),
                "copy-session": rv(c, "C_CopyObject", ro, sess_obj, [s(CKA_LABEL, "p15-c")]),
                "set-session": rv(c, "C_SetAttributeValue", ro, sess_obj,
                                  [s(CKA_ID, b"\x09")]),
                "gen-token": rv(c, "C_GenerateKey", ro, gen, [
                    b(CKA_TOKEN, True), u(CKA_VALUE_LEN, 16), s(CKA_LABEL, "p15-g")]),
                "gen-session": rv(c, "C_GenerateKey", ro, gen, [
                    b(CKA_TOKEN, False), u(CKA_VALUE_LEN, 16), s(CKA_LABEL, "p15-g")]),
                "pair-token": rv(c, "C_GenerateKeyPair", ro, Mechanism(CKM_EC_KEY_PAIR_GEN,
                                                                      None),
                                 [s(CKA_EC_PARAMS, P256), b(CKA_TOKEN, True)],
                                 [b(CKA_TOKEN, True), s(CKA_LABEL, "p15-p")]),
                "destroy-token": rv(c, "C_DestroyObject", ro, tok),
                "destroy-session": rv(c, "C_DestroyObject", ro, sess_obj),
            }
            rv(c, "C_DestroyObject", rw, tok)
            out[label] = {k: ckr.name(v) for k, v in codes.items()}
        assert out["ha-token"] == out["plain-token"], out
        assert out["ha-token"]["create-token"] == "CKR_SESSION_READ_ONLY"
    finally:
        c.close()


# ---------------------------------------------------------------- 8: the wrapping key

def test_the_pool_wrapping_key_is_invisible(tmp_path: Path) -> None:
    members = [make_member(tmp_path, i, None) for i in range(2)]
    for m in members:  # provisioned by the operator on each member
        key = tmp_path / "wrap.bin"
        key.write_bytes(bytes(range(32)))
        subprocess.run(["pkcs11-tool", "--module", m["module"], "--token-label", m["label"],
                        "--login", "--pin", PIN, "--write-object", str(key), "--type",
                        "secrkey", "--key-type", "AES:32", "--label", "pool-wrap",
                        "--id", "77"], env={**os.environ, "SOFTHSM2_CONF": m["conf"]},
                       check=True, capture_output=True)
    gw = Gateway(pool_config(tmp_path, members, extra_pool=(
        'replication = "gateway"\nwrapping_key = "pool-wrap"')))
    try:
        e = Env(tmp_path, gw)
        c = e.client()
        h = e.session(c)
        (mine,) = call(c, "C_CreateObject", h, aes("client-key", token=True,
                                                  value=bytes(32)))
        assert labels(c, h, find(c, h, [u(CKA_CLASS, CKO_SECRET_KEY)])) == ["client-key"]
        assert find(c, h, [s(CKA_LABEL, "pool-wrap")]) == []
        assert find(c, h, [s(CKA_ID, b"\x77")]) == []
        assert labels(c, h, find(c, h, [])) == ["client-key"]
        # guessed handles never reach it
        for guess in range(1, 64):
            if guess == mine:
                continue
            r = rv(c, "C_GetAttributeValue", h, guess, [AttrRequest(CKA_LABEL, 64)])
            assert r == ckr.OBJECT_HANDLE_INVALID, (guess, ckr.name(r))
            r = rv(c, "C_EncryptInit", h, Mechanism(CKM_AES_ECB, None), guess)
            assert r in (ckr.KEY_HANDLE_INVALID, ckr.OBJECT_HANDLE_INVALID), ckr.name(r)
        # the replicated creation still works (it is the pool's, not the client's, key)
        assert all(m["state"] == "up" for m in e.members())
        c.close()
    finally:
        gw.stop()


# ---------------------------------------------------------------- 14: bad input stays put

def test_malformed_calls_take_no_member_down(tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys", rsa_key=False)
    members = [make_member(tmp_path, i, keys) for i in range(2)]
    gw = Gateway(pool_config(tmp_path, members, max_sessions=3))
    e = Env(tmp_path, gw)
    stop = threading.Event()
    errors: list[str] = []
    signed = [0]

    def bystander() -> None:
        c = e.client()
        h = e.session(c)
        (k,) = find(c, h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
        while not stop.is_set():
            try:
                call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), k)
                call(c, "C_Sign", h, bytes(32), 128)
                signed[0] += 1
            except Exception as ex:
                errors.append(repr(ex))
        c.close()

    t = threading.Thread(target=bystander)
    try:
        t.start()
        c = e.client()
        h = e.session(c)
        (k,) = call(c, "C_CreateObject", h, aes("p14", value=bytes(16)))
        (ec,) = find(c, h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
        hostile_codes = set()
        for i in range(40):
            for name, args in (
                ("C_DecryptInit", [Mechanism(CKM_AES_CBC_PAD, bytes(16)), k]),
                ("C_Decrypt", [bytes(range(i % 16 + 1)), 64]),
                ("C_EncryptInit", [Mechanism(CKM_AES_ECB, None), k]),
                ("C_Encrypt", [bytes(i % 15 + 1), 64]),
                ("C_DecryptInit", [Mechanism(CKM_AES_CBC_PAD, bytes(16)), k]),
                ("C_DecryptUpdate", [bytes(7), 64]),
                ("C_DecryptFinal", [64]),
                ("C_DigestInit", [Mechanism(CKM_SHA256, None)]),
                ("C_DigestKey", [ec]),
                ("C_SignInit", [Mechanism(CKM_ECDSA, None), k]),
                ("C_SignInit", [Mechanism(CKM_ECDSA, None), ec]),
                ("C_Sign", [bytes(3), 128]),
                ("C_Sign", [bytes(32), 128]),
            ):
                hostile_codes.add(rv(c, name, h, *args))
        c.close()
        stop.set()
        t.join(30)
        assert errors == [], sorted(set(errors))
        assert signed[0] > 0
        assert [m["downs"] for m in e.members()] == [0, 0]
        assert [m["state"] for m in e.members()] == ["up", "up"]
        print(f"\nbystander signatures: {signed[0]}, hostile results: "
              f"{sorted(ckr.name(x) for x in hostile_codes)}")
    finally:
        stop.set()
        t.join(30)
        gw.stop()


# ---------------------------------------------------------------- 10: replayed on failover

def test_context_specific_login_is_replayed_on_failover(tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys", rsa_key=False)
    members = [make_member(tmp_path, i, None) for i in range(2)]
    for m in members:  # the same CKA_ALWAYS_AUTHENTICATE key on both members
        subprocess.run(["pkcs11-tool", "--module", m["module"], "--token-label", m["label"],
                        "--login", "--pin", PIN, "--write-object", str(keys["ec-priv"]),
                        "--type", "privkey", "--id", "0a", "--label", "auth1",
                        "--always-auth"], env={**os.environ, "SOFTHSM2_CONF": m["conf"]},
                       check=True, capture_output=True)
    gw = Gateway(pool_config(tmp_path, members, call_timeout=3.0))
    try:
        e = Env(tmp_path, gw)
        c = e.client()
        h = e.session(c)
        (k,) = find(c, h, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "auth1")])
        call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), k)
        call(c, "C_Login", h, CKU_CONTEXT_SPECIFIC, PIN.encode())
        holder = next(m for m in e.members() if m["sessions_leased"] == 1)["backend"]
        st = query(str(tmp_path / "state" / "admin.sock"))
        pid = next(b["pid"] for b in st["backends"] if b["name"] == holder)
        os.kill(pid, 9)  # the member holding the operation (and the login) dies
        (sig,) = call(c, "C_Sign", h, bytes(32), 128)  # replayed: Init, login, Sign
        assert len(sig) == 64
        pool = query(str(tmp_path / "state" / "admin.sock"))["pools"][0]
        assert pool["replays"] >= 1
        # the login was for that operation only
        call(c, "C_SignInit", h, Mechanism(CKM_ECDSA, None), k)
        assert rv(c, "C_Sign", h, bytes(32), 128) == ckr.USER_NOT_LOGGED_IN
        c.close()
    finally:
        gw.stop()

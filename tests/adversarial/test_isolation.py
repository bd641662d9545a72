"""Issue 9, points 2–5 and 7: tenant isolation against a client that speaks raw frames.

Tenants are other uids (forked children that drop to uid 1001…), so the gateway tells
them apart by their unix peer credentials; every call is a raw RPC frame. Each test
failed on the gateway before the fix it guards.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_ID,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_PRIVATE,
    CKA_TOKEN,
    CKF_RW,
    CKF_SERIAL,
    CKM_AES_KEY_GEN,
    CKM_ECDSA,
    CKO_DATA,
    CKO_PRIVATE_KEY,
    CKS_RO_PUBLIC,
    CKU_USER,
    aes_template,
    answer,
    b,
    call,
    pipeline,
    rv,
    s,
    send,
    u,
)
from tests.gateway_proc import Gateway, RawClient
from tests.policy.tenants import as_uid, raw, remove, shared_socket_dir, slot_of
from tests.softhsm import make_token

from p11gate.codec import HANDSHAKE, Mechanism, ckr
from p11gate.frontend.pins import hash_pin

A, B, RO, PREFIXED, FLOOD = 1001, 1002, 1003, 1005, 1006
A_PIN = "alpha-pin-1"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("isolation")
    hsm = base / "softhsm"
    shared = make_token(hsm, label="shared")
    make_token(hsm, label="mapped", pin="Backend-Secret-1", keys=False)
    make_token(hsm, label="pt", pin="pt-right-pin", keys=False)
    make_token(hsm, label="mapped2", pin="Backend-Secret-1", keys=False)
    (base / "mapped.pin").write_text("Backend-Secret-1\n")
    (base / "mapped.pin").chmod(0o600)
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"

[audit]
file = "{base / 'audit.jsonl'}"

[[backend]]
name = "softhsm"
module = "{shared['module']}"
env = {{ SOFTHSM2_CONF = "{shared['conf']}" }}

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "shared" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
pin_mode = "mapped"
backend_pin_file = "{base / 'mapped.pin'}"
pins = {{ "uid:{FLOOD}" = "{hash_pin(A_PIN.encode())}" }}
max_pin_failures = 3
pin_lockout = 60.0

[[token]]
name = "mapped2"
backend = "softhsm"
select = {{ label = "mapped2" }}
pin_mode = "mapped"
backend_pin_file = "{base / 'mapped.pin'}"
pins = {{ "uid:{FLOOD}" = "{hash_pin(A_PIN.encode())}" }}
max_pin_failures = 3

[[token]]
name = "pt"
backend = "softhsm"
select = {{ label = "pt" }}
max_pin_failures = 3
pin_lockout = 60.0

[[rule]]
name = "team-a"
uid = [{A}]
tokens = ["shared"]
namespace = {{ owned = true }}

[[rule]]
name = "team-b"
uid = [{B}]
tokens = ["shared"]
namespace = {{ owned = true }}

[[rule]]
name = "team-c"
uid = [{PREFIXED}]
tokens = ["shared"]
namespace = {{ label_prefix = "team-c/" }}

[[rule]]
name = "auditors"
uid = [{RO}]
tokens = ["shared"]
role = "readonly"

[[rule]]
name = "flood"
uid = [{FLOOD}]
tokens = ["mapped", "mapped2", "pt"]
role = "user"

[[rule]]
name = "admins"
uid = [0]
tokens = ["*"]
role = "officer"
""")
    gw = Gateway(cfg)
    # a key nobody owns, made by the officer before any tenant came
    c = raw(gw.path)
    slot = slot_of(c, "shared")
    (sess,) = call(c, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
    call(c, "C_Login", sess, CKU_USER, shared["pin"].encode())
    call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
         aes_template("pre-aes", b"\xff"))
    c.close()
    yield {"gw": gw, "base": base, "pin": shared["pin"], "audit": base / "audit.jsonl"}
    alive = gw.alive()
    gw.stop()
    remove(sockdir)
    assert alive, gw.log()[-3000:]


def audit(env: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in env["audit"].read_text().splitlines()]


def session(c: RawClient, label: str, rw: bool = True) -> int:
    (h,) = call(c, "C_OpenSession", slot_of(c, label), CKF_SERIAL | (CKF_RW if rw else 0))
    return int(h)


def user_session(c: RawClient, label: str, pin: str) -> int:
    sess = session(c, label)
    if rv(c, "C_Login", sess, CKU_USER, pin.encode()) not in (0, ckr.USER_ALREADY_LOGGED_IN):
        raise AssertionError("login failed")
    return sess


def officer_count(env: dict[str, Any], template: list[Any]) -> int:
    """How many objects the officer (root, no namespace, logged in) finds: the truth."""
    c = raw(env["gw"].path)
    sess = user_session(c, "shared", env["pin"])
    try:
        return len(c.find(sess, template))
    finally:
        c.close()


# ---------------------------------------------------------------- point 3: duplicates


def _duplicates(path: str, pin: str) -> dict[str, int]:
    c = raw(path)
    sess = session(c, "shared", rw=False)  # read-only, not logged in
    data = [u(CKA_CLASS, CKO_DATA), s(CKA_LABEL, "dup-ro"), s(0x11, b"x")]
    out = {
        # false first, true last: the gateway read the first, SoftHSM applied the last
        "token_twice": rv(c, "C_CreateObject", sess, [b(CKA_TOKEN, False), *data,
                                                     b(CKA_TOKEN, True)]),
        "private_twice": rv(c, "C_CreateObject", sess, [b(CKA_PRIVATE, False), *data,
                                                       b(CKA_PRIVATE, True)]),
        "find_twice": rv(c, "C_FindObjectsInit", sess, [b(CKA_PRIVATE, False),
                                                       b(CKA_PRIVATE, True)]),
        "generate_twice": rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                             [*aes_template("dup-gen", b"\x51", token=False),
                              b(CKA_TOKEN, True)]),
    }
    # one of each is fine
    out["single"] = rv(c, "C_CreateObject", sess, [b(CKA_TOKEN, False),
                                                   b(CKA_PRIVATE, False), *data])
    c.close()
    return out


def test_a_template_naming_an_attribute_twice_is_refused(env: dict[str, Any]) -> None:
    res = as_uid(RO, _duplicates, env["gw"].path, env["pin"])
    assert res == {"token_twice": ckr.TEMPLATE_INCONSISTENT,
                   "private_twice": ckr.TEMPLATE_INCONSISTENT,
                   "find_twice": ckr.TEMPLATE_INCONSISTENT,
                   "generate_twice": ckr.TEMPLATE_INCONSISTENT,
                   "single": ckr.OK}
    # nothing was made on the token behind the refusals
    assert officer_count(env, [s(CKA_LABEL, "dup-ro"), b(CKA_TOKEN, True)]) == 0
    assert officer_count(env, [s(CKA_LABEL, "dup-gen")]) == 0


# ---------------------------------------------------------------- point 2: renames


def _make_own_key(path: str, pin: str, label: str, cka_id: bytes) -> int:
    c = raw(path)
    sess = user_session(c, "shared", pin)
    (h,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                aes_template(label, cka_id))
    c.close()
    return int(h)


def _rename_attacks(path: str, pin: str) -> dict[str, Any]:
    c = raw(path)
    sess = user_session(c, "shared", pin)
    (key,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                  aes_template("b-key", b"\xb1"))
    out: dict[str, Any] = {
        # onto tenant A's key, onto the officer's pre-existing key, into a prefix
        # tenant's namespace, and with ID/LABEL twice (first pair harmless, last pair A's)
        "onto_owned": rv(c, "C_SetAttributeValue", sess, key,
                         [s(CKA_ID, b"\xa1"), s(CKA_LABEL, "a-aes")]),
        "onto_unowned": rv(c, "C_SetAttributeValue", sess, key,
                           [s(CKA_ID, b"\xff"), s(CKA_LABEL, "pre-aes")]),
        "into_prefix": rv(c, "C_SetAttributeValue", sess, key,
                          [s(CKA_LABEL, "team-c/planted")]),
        "twice": rv(c, "C_SetAttributeValue", sess, key,
                    [s(CKA_ID, b"\xb1"), s(CKA_LABEL, "x"), s(CKA_ID, b"\xa1"),
                     s(CKA_LABEL, "a-aes")]),
        # a rename to a fresh identity of its own is fine
        "fresh": rv(c, "C_SetAttributeValue", sess, key, [s(CKA_LABEL, "b-renamed")]),
    }
    out["sees_a"] = c.find(sess, [s(CKA_LABEL, "a-aes")])
    out["sees_pre"] = c.find(sess, [s(CKA_LABEL, "pre-aes")])
    out["sees_own"] = len(c.find(sess, [s(CKA_LABEL, "b-renamed")]))
    c.close()
    return out


def _find_label(path: str, pin: str, label: str) -> int:
    c = raw(path)
    sess = user_session(c, "shared", pin)
    n = len(c.find(sess, [s(CKA_LABEL, label)]))
    c.close()
    return n


def test_a_rename_gets_the_checks_of_a_creation(env: dict[str, Any]) -> None:
    path = env["gw"].path
    as_uid(A, _make_own_key, path, env["pin"], "a-aes", b"\xa1")
    res = as_uid(B, _rename_attacks, path, env["pin"])
    assert res["onto_owned"] == ckr.ATTRIBUTE_VALUE_INVALID
    # the same code whether another tenant owns the identity or nobody does
    assert res["onto_unowned"] == ckr.ATTRIBUTE_VALUE_INVALID
    assert res["into_prefix"] == ckr.TEMPLATE_INCONSISTENT
    assert res["twice"] == ckr.TEMPLATE_INCONSISTENT
    assert res["fresh"] == ckr.OK
    assert res["sees_a"] == [] and res["sees_pre"] == [] and res["sees_own"] == 1
    # A still finds exactly its own key under its label; the prefix tenant finds nothing
    # planted; the officer sees one object per identity
    assert as_uid(A, _find_label, path, env["pin"], "a-aes") == 1
    assert as_uid(PREFIXED, _find_label, path, env["pin"], "team-c/planted") == 0
    assert officer_count(env, [s(CKA_LABEL, "a-aes")]) == 1
    assert officer_count(env, [s(CKA_LABEL, "pre-aes")]) == 1
    denials = [r for r in audit(env) if r["op"] == "C_SetAttributeValue" and r.get("denied")]
    assert len(denials) >= 3, denials


def _create_taken(path: str, pin: str, label: str, cka_id: bytes) -> int:
    c = raw(path)
    sess = user_session(c, "shared", pin)
    code = rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
              aes_template(label, cka_id))
    c.close()
    return code


def test_creation_codes_say_only_not_allowed(env: dict[str, Any]) -> None:
    path = env["gw"].path
    as_uid(A, _make_own_key, path, env["pin"], "a-second", b"\xa2")
    # B: an identity A owns, and one nobody owns: one code for both
    owned = as_uid(B, _create_taken, path, env["pin"], "a-second", b"\xa2")
    unowned = as_uid(B, _create_taken, path, env["pin"], "pre-aes", b"\xff")
    assert owned == unowned == ckr.ATTRIBUTE_VALUE_INVALID
    # the prefix tenant, outside its prefix: one code whether the identity is taken or not
    taken = as_uid(PREFIXED, _create_taken, path, env["pin"], "a-second", b"\xa2")
    free = as_uid(PREFIXED, _create_taken, path, env["pin"], "never-made", b"\x77")
    assert taken == free == ckr.TEMPLATE_INCONSISTENT
    assert officer_count(env, [s(CKA_LABEL, "a-second")]) == 1
    assert officer_count(env, [s(CKA_LABEL, "never-made")]) == 0


# ---------------------------------------------------------------- point 4: logout


def _find_after_logout(path: str, pin: str) -> dict[str, Any]:
    c = raw(path)
    sess = session(c, "shared", rw=False)
    sign = session(c, "shared", rw=False)
    call(c, "C_Login", sess, CKU_USER, pin.encode())
    # an EC key: ECDSA with another family's key is refused before the module
    call(c, "C_FindObjectsInit", sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), u(CKA_KEY_TYPE, 3)])
    (keys,) = call(c, "C_FindObjects", sess, 1)
    (key,) = keys
    call(c, "C_SignInit", sign, Mechanism(CKM_ECDSA, None), key)
    call(c, "C_Logout", sess)
    out: dict[str, Any] = {
        "find_next": rv(c, "C_FindObjects", sess, 16),
        "sign_after": rv(c, "C_Sign", sign, b"\x00" * 32, 256),
        "key_after": rv(c, "C_SignInit", sign, Mechanism(CKM_ECDSA, None), key),
        "find_private": c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY)]),
    }
    # the last session's close logs the connection out (PKCS#11 §5.6)
    call(c, "C_Login", sess, CKU_USER, pin.encode())
    call(c, "C_CloseSession", sess)
    call(c, "C_CloseSession", sign)
    fresh = session(c, "shared", rw=False)
    out["state_after_close"] = call(c, "C_GetSessionInfo", fresh)[1]
    out["private_after_close"] = c.find(fresh, [u(CKA_CLASS, CKO_PRIVATE_KEY)])
    c.close()
    return out


def test_finds_and_private_key_operations_end_at_logout(env: dict[str, Any]) -> None:
    res = as_uid(RO, _find_after_logout, env["gw"].path, env["pin"])
    assert res["find_next"] == ckr.OPERATION_NOT_INITIALIZED
    assert res["sign_after"] == ckr.OPERATION_NOT_INITIALIZED
    # the private key's handle died with the login
    assert res["key_after"] in (ckr.OBJECT_HANDLE_INVALID, ckr.KEY_HANDLE_INVALID)
    assert res["find_private"] == []
    assert res["state_after_close"] == CKS_RO_PUBLIC
    assert res["private_after_close"] == []


def _sign_again_after_relogin(path: str, pin: str) -> list[int]:
    """A fenced operation kind works again once a new one starts."""
    c = raw(path)
    sess = session(c, "shared", rw=False)
    call(c, "C_Login", sess, CKU_USER, pin.encode())
    (key,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
    call(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), key)
    call(c, "C_Logout", sess)
    call(c, "C_Login", sess, CKU_USER, pin.encode())
    (key,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, "ec1")])
    codes = [rv(c, "C_SignInit", sess, Mechanism(CKM_ECDSA, None), key)]
    (sig,) = call(c, "C_Sign", sess, b"\x01" * 32, 256)
    codes.append(len(sig))
    c.close()
    return codes


def test_a_new_operation_after_logging_in_again_works(env: dict[str, Any]) -> None:
    assert as_uid(RO, _sign_again_after_relogin, env["gw"].path, env["pin"]) == [0, 64]


# ---------------------------------------------------------------- point 5: PIN floods


def _login_flood(path: str, token: str, wrong: int, right: str) -> dict[str, Any]:
    c = raw(path)
    slot = slot_of(c, token)
    sessions = [call(c, "C_OpenSession", slot, CKF_SERIAL)[0] for _ in range(wrong + 1)]
    reqs = [("C_Login", [h, CKU_USER, f"wrong-{i:04d}".encode()])
            for i, h in enumerate(sessions[:-1])]
    reqs.append(("C_Login", [sessions[-1], CKU_USER, right.encode()]))
    codes = pipeline(c, reqs)
    c.close()
    return {"incorrect": codes.count(ckr.PIN_INCORRECT), "locked": codes.count(ckr.PIN_LOCKED),
            "right": codes[-1], "other": [x for x in codes
                                          if x not in (ckr.PIN_INCORRECT, ckr.PIN_LOCKED)]}


def test_pin_attempts_sent_at_once_are_counted_before_they_are_checked(
    env: dict[str, Any],
) -> None:
    path = env["gw"].path
    # mapped: 199 wrong PINs then the right one, all at once: at most 3 are checked, and
    # the right one comes too late
    res = as_uid(FLOOD, _login_flood, path, "mapped", 199, A_PIN)
    assert res["incorrect"] <= 3 and res["incorrect"] + res["locked"] == 200, res
    assert res["right"] == ckr.PIN_LOCKED
    # passthrough, nobody logged in: every wrong PIN would reach the device; at most 3 do
    pt = as_uid(FLOOD, _login_flood, path, "pt", 199, "pt-right-pin")
    assert pt["incorrect"] <= 3 and pt["incorrect"] + pt["locked"] == 200, pt
    assert pt["right"] == ckr.PIN_LOCKED
    refused = [r for r in audit(env) if r.get("throttled") and r["token"] in ("mapped", "pt")]
    assert len(refused) >= 390


def test_right_pins_sent_at_once_all_succeed(env: dict[str, Any]) -> None:
    """Counting attempts when they start must not refuse honest concurrent logins:
    more than max_pin_failures of them wait for the ones in flight, then succeed."""
    assert as_uid(FLOOD, _state_after_parallel_logins, env["gw"].path, 8) == [1] * 8


def _state_after_parallel_logins(path: str, n: int) -> list[int]:
    conns = [raw(path) for _ in range(n)]
    sessions = [session(c, "mapped2", rw=False) for c in conns]
    codes = [send(c, "C_Login", h, CKU_USER, A_PIN.encode())
             for c, h in zip(conns, sessions, strict=True)]
    out = []
    for c, h, code in zip(conns, sessions, codes, strict=True):
        assert answer(c, code) == 0
        out.append(call(c, "C_GetSessionInfo", h)[1])  # CKS_RO_USER_FUNCTIONS
        c.close()
    return out


def _login_logout_pairs(path: str, pin: str, n: int) -> int:
    c = raw(path)
    sess = session(c, "shared", rw=False)
    reqs: list[tuple[str, list[Any]]] = []
    for _ in range(n):
        reqs += [("C_Login", [sess, CKU_USER, pin.encode()]), ("C_Logout", [sess])]
    codes = pipeline(c, reqs)
    c.close()
    return sum(1 for x in codes if x == 0)


def test_pin_hashing_does_not_stall_other_clients(env: dict[str, Any]) -> None:
    """200 login/logout pairs (each login hashes the PIN) while a bystander asks for
    random bytes: the bystander's longest wait stays far below the 2.5 s the hashing on
    the event loop used to cost it."""
    path = env["gw"].path
    holder = raw(path)  # keeps the backend logged in: later logins are hash checks
    hs = session(holder, "shared", rw=False)
    call(holder, "C_Login", hs, CKU_USER, env["pin"].encode())
    by = raw(path)
    bs = session(by, "shared", rw=False)
    worst = [0.0]
    stop = threading.Event()

    def bystander() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            call(by, "C_GenerateRandom", bs, 32)
            worst[0] = max(worst[0], time.monotonic() - t0)

    th = threading.Thread(target=bystander)
    th.start()
    try:
        ok = as_uid(RO, _login_logout_pairs, path, env["pin"], 200)
    finally:
        stop.set()
        th.join()
    holder.close()
    by.close()
    assert ok == 400
    assert worst[0] < 1.0, f"bystander waited {worst[0]:.2f} s"


# ---------------------------------------------------------------- point 7: lifecycle


def test_after_finalize_only_initialize_is_served(env: dict[str, Any]) -> None:
    c = raw(env["gw"].path)
    slot = slot_of(c, "shared")
    assert rv(c, "C_Initialize", HANDSHAKE, 0, b"\0") == ckr.CRYPTOKI_ALREADY_INITIALIZED
    assert rv(c, "C_Finalize") == ckr.OK
    assert rv(c, "C_GetSlotList", 1, 16) == ckr.CRYPTOKI_NOT_INITIALIZED
    assert rv(c, "C_OpenSession", slot, CKF_SERIAL) == ckr.CRYPTOKI_NOT_INITIALIZED
    assert rv(c, "C_GetInfo") == ckr.CRYPTOKI_NOT_INITIALIZED
    c.initialize()
    assert rv(c, "C_OpenSession", slot, CKF_SERIAL) == ckr.OK
    c.close()


def _session_objects_of_readonly(path: str) -> dict[str, int]:
    """A read-only identity may make session objects (use), never token objects."""
    c = raw(path)
    sess = session(c, "shared", rw=False)
    out = {"session": rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                         [*aes_template("ro-session", b"\x01", token=False),
                          b(CKA_PRIVATE, False)]),
           "token": rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                       aes_template("ro-token", b"\x02", token=True))}
    c.close()
    return out


def test_readonly_identity_makes_no_token_objects(env: dict[str, Any]) -> None:
    res = as_uid(RO, _session_objects_of_readonly, env["gw"].path)
    assert res["session"] == ckr.OK
    assert res["token"] in (ckr.TOKEN_WRITE_PROTECTED, ckr.ACTION_PROHIBITED)
    assert officer_count(env, [s(CKA_LABEL, "ro-token")]) == 0

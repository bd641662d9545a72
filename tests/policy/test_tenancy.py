"""Issue 4: identity, policy, namespaces, PIN modes and audit, with real clients.

Clients run as other uids (forked children that drop to uid 1001/1002/1003, and
pkcs11-tool started with that uid), so the gateway tells them apart by their unix peer
credentials. All tokens are real SoftHSMv2 tokens behind one gateway.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11  # imported here: a child that dropped to another uid cannot read the venv
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tests.gateway_proc import CLIENT_MODULE, Gateway, rv_of
from tests.policy.tenants import (
    CKF_RW,
    CKF_SERIAL,
    CKU_SO,
    CKU_USER,
    C_CreateObject,
    C_DestroyObject,
    C_FindObjects,
    C_FindObjectsFinal,
    C_FindObjectsInit,
    C_GetAttributeValue,
    C_GetSlotList,
    C_GetTokenInfo,
    C_InitPIN,
    C_InitToken,
    C_Login,
    C_Logout,
    C_OpenSession,
    C_SignInit,
    as_uid,
    find,
    raw,
    remove,
    shared_socket_dir,
    slot_of,
    tool_as,
)
from tests.softhsm import make_token

from p11gate.codec import Attribute, AttrRequest, Mechanism, ckr
from p11gate.frontend.pins import hash_pin

A, B, RO, STRANGER, PREFIXED = 1001, 1002, 1003, 1004, 1005
BACKEND_PIN = "Backend-Secret-7731"  # the mapped token's real PIN: must never leak
A_PIN = "alpha-pin-1"
CKM_ECDSA = 0x1041
CKA_CLASS, CKA_ID, CKA_LABEL, CKO_PRIVATE_KEY = 0, 0x102, 3, 3
CKA_KEY_TYPE, CKK_EC = 0x100, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("tenancy")
    hsm = base / "softhsm"
    shared = make_token(hsm, label="shared")
    make_token(hsm, label="vault", keys=False)
    make_token(hsm, label="mapped", pin=BACKEND_PIN)
    make_token(hsm, label="nopin", pin="nopin-backend-pin")
    (base / "mapped.pin").write_text(BACKEND_PIN + "\n")
    (base / "nopin.pin").write_text("nopin-backend-pin\n")
    for pin_file in ("mapped.pin", "nopin.pin"):
        (base / pin_file).chmod(0o600)  # serve refuses a PIN file others can read
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"
log_level = "debug"

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
name = "vault"
backend = "softhsm"
select = {{ label = "vault" }}

[[token]]
name = "mapped"
backend = "softhsm"
select = {{ label = "mapped" }}
pin_mode = "mapped"
backend_pin_file = "{base / 'mapped.pin'}"
pins = {{ "uid:{A}" = "{hash_pin(A_PIN.encode())}" }}
max_pin_failures = 3
pin_lockout = 2.0

[[token]]
name = "nopin"
backend = "softhsm"
select = {{ label = "nopin" }}
pin_mode = "none"
backend_pin_file = "{base / 'nopin.pin'}"

[[rule]]
name = "team-a-pins"
uid = [{A}]
tokens = ["mapped", "nopin"]
role = "user"

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
name = "admins"
uid = [0]
tokens = ["*"]
role = "officer"
""")
    gw = Gateway(cfg)
    yield {"gw": gw, "base": base, "pin": shared["pin"], "so_pin": shared["so_pin"],
           "audit": base / "audit.jsonl", "cfg": cfg}
    alive = gw.alive()
    gw.stop()
    remove(sockdir)
    assert alive, gw.log()[-3000:]


def audit_records(env: dict[str, Any]) -> list[dict[str, Any]]:
    path: Path = env["audit"]
    return [json.loads(line) for line in path.read_text().splitlines()]


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


# ---------------------------------------------------------------- what each one sees


def _labels(path: str) -> list[str]:
    c = raw(path)
    (slots,) = c.call(C_GetSlotList, [1, 16])
    return sorted(c.call(C_GetTokenInfo, [s])[0].rstrip(b" ").decode() for s in slots)


def test_each_identity_sees_only_the_tokens_policy_grants(env: dict[str, Any]) -> None:
    path = env["gw"].path
    assert _labels(path) == ["mapped", "nopin", "shared", "vault"]  # root: officer
    assert as_uid(A, _labels, path) == ["mapped", "nopin", "shared"]
    assert as_uid(B, _labels, path) == ["shared"]
    assert as_uid(STRANGER, _labels, path) == []  # no rule: no token at all


def _probe_unseen_slot(path: str, slot: int) -> int:
    return rv_of(raw(path), C_GetTokenInfo, [slot])


def test_an_unseen_token_has_no_slot(env: dict[str, Any]) -> None:
    vault = slot_of(raw(env["gw"].path), "vault")
    assert as_uid(B, _probe_unseen_slot, env["gw"].path, vault) == ckr.SLOT_ID_INVALID


# ---------------------------------------------------------------- namespaces, pkcs11-tool


def _pubkey(uid: int, gw: Gateway, kid: str, tmp: Path) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    out = tmp / f"pub-{uid}-{kid}.der"
    ok(tool_as(uid, gw, "--token-label", "shared", "--read-object", "--type", "pubkey",
               "--id", kid, "-o", str(out)))
    key = load_der_public_key(out.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_tenants_list_use_and_destroy_only_their_own_keys(env: dict[str, Any]) -> None:
    gw, pin = env["gw"], env["pin"]
    out = Path("/tmp") / f"p11gate-tenancy-{os.getpid()}"
    out.mkdir(exist_ok=True)
    out.chmod(0o777)
    login = ["--token-label", "shared", "--login", "--pin", pin]
    for uid, kid, label in ((A, "a1", "team-a-key"), (B, "b1", "team-b-key")):
        ok(tool_as(uid, gw, *login, "--keypairgen", "--key-type", "EC:prime256v1",
                   "--id", kid, "--label", label))
    listing_a = ok(tool_as(A, gw, *login, "-O"))
    listing_b = ok(tool_as(B, gw, *login, "-O"))
    assert "team-a-key" in listing_a and "team-b-key" not in listing_a
    assert "team-b-key" in listing_b and "team-a-key" not in listing_b
    # keys on the shared token that no tenant created are outside both namespaces
    assert "label:      ec1\n" not in listing_a and "label:      rsa1\n" not in listing_b
    # the officer (no namespace) sees everything
    listing_root = ok(tool_as(0, gw, *login, "-O"))
    assert all(f"label:      {k}\n" in listing_root for k in ("team-a-key", "team-b-key", "ec1"))

    data = out / "data"
    data.write_bytes(os.urandom(32))
    data.chmod(0o644)
    sig = out / "sig"
    ok(tool_as(A, gw, *login, "--sign", "--mechanism", "ECDSA", "--id", "a1",
               "-i", str(data), "-o", str(sig)))
    raw_sig = sig.read_bytes()
    der = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"),
                               int.from_bytes(raw_sig[32:], "big"))
    _pubkey(A, gw, "a1", out).verify(der, data.read_bytes(),
                                     ec.ECDSA(Prehashed(hashes.SHA256())))
    # A cannot sign with, read or delete B's key; B cannot delete A's
    r = tool_as(A, gw, *login, "--sign", "--mechanism", "ECDSA", "--id", "b1",
                "-i", str(data), "-o", str(out / "sig2"))
    assert r.returncode != 0
    assert tool_as(A, gw, "--token-label", "shared", "--read-object", "--type", "pubkey",
                   "--id", "b1", "-o", str(out / "stolen")).returncode != 0
    tool_as(B, gw, *login, "--delete-object", "--type", "privkey", "--id", "a1")
    assert "team-a-key" in ok(tool_as(A, gw, *login, "-O", "--type", "privkey"))
    # B cannot take A's identity for a key of its own
    r = tool_as(B, gw, *login, "--keypairgen", "--key-type", "EC:prime256v1",
                "--id", "a1", "--label", "team-a-key")
    assert r.returncode != 0
    assert ok(tool_as(A, gw, *login, "-O", "--type", "privkey")).count("team-a-key") == 1
    # A destroys its own key
    ok(tool_as(A, gw, *login, "--delete-object", "--type", "privkey", "--id", "a1"))
    assert "team-a-key" not in ok(tool_as(A, gw, *login, "-O", "--type", "privkey"))
    assert "team-b-key" in ok(tool_as(B, gw, *login, "-O", "--type", "privkey"))


# ---------------------------------------------------------------- python-pkcs11, guessing


def _pkcs11_tenant(address: str, pin: str, n: int, foreign: str) -> dict[str, Any]:
    """python-pkcs11 as a tenant: make a key, list what it sees, sign n times."""
    os.environ["P11_KIT_SERVER_ADDRESS"] = address
    from pkcs11 import KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    lib = pkcs11.lib(CLIENT_MODULE)
    token = lib.get_token(token_label="shared")
    label = f"py-{os.getuid()}"
    with token.open(user_pin=pin, rw=True) as s:
        params = s.create_domain_parameters(
            KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(
                "secp256r1")}, local=True)
        pub, priv = params.generate_keypair(store=True, label=label,
                                            id=os.getuid().to_bytes(2, "big"))
        seen = sorted({o[pkcs11.Attribute.LABEL] for o in s.get_objects()})
        sigs = [priv.sign(hashlib.sha256(b"message %d" % i).digest(),
                          mechanism=Mechanism.ECDSA) for i in range(n)]
        point = bytes(pub[pkcs11.Attribute.EC_POINT])
        others = list(s.get_objects({pkcs11.Attribute.LABEL: foreign})) + list(
            s.get_objects({pkcs11.Attribute.LABEL: "ec1"}))
        priv.destroy()
        pub.destroy()
    return {"seen": seen, "sigs": sigs, "point": point, "others": len(others),
            "label": label}


def _verify_all(point: bytes, sigs: list[bytes]) -> None:
    # CKA_EC_POINT is a DER OCTET STRING around the uncompressed point
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    for i, sig in enumerate(sigs):
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                   int.from_bytes(sig[32:], "big"))
        key.verify(der, hashlib.sha256(b"message %d" % i).digest(),
                   ec.ECDSA(Prehashed(hashes.SHA256())))


def test_python_pkcs11_tenants_are_confined_and_audited(env: dict[str, Any]) -> None:
    gw = env["gw"]
    before = len(audit_records(env))
    res_a = as_uid(A, _pkcs11_tenant, gw.address, env["pin"], 20, "team-b-key")
    res_b = as_uid(B, _pkcs11_tenant, gw.address, env["pin"], 7, "team-a-key")
    # its own objects only (A's team-a-key public key is left from the pkcs11-tool test):
    # not B's, not the unowned ec1/rsa1
    assert res_a["seen"] == sorted({res_a["label"], "team-a-key"})
    assert res_b["seen"] == sorted({res_b["label"], "team-b-key"})
    assert res_a["others"] == 0 and res_b["others"] == 0
    _verify_all(res_a["point"], res_a["sigs"])
    _verify_all(res_b["point"], res_b["sigs"])
    # one audit record per key use, with identity, token, key identity and result
    new = audit_records(env)[before:]
    uses_a = [r for r in new if r["op"] == "C_SignInit" and r["identity"].startswith(
        f"uid={A} ")]
    uses_b = [r for r in new if r["op"] == "C_SignInit" and r["identity"].startswith(
        f"uid={B} ")]
    assert len(uses_a) == 20 and len(uses_b) == 7
    assert all(r["result"] == "CKR_OK" and r["token"] == "shared" for r in uses_a)
    assert {r["object"].get("label") for r in uses_a} == {res_a["label"]}
    assert uses_a[0]["mechanism"] == "0x1041"  # CKM_ECDSA
    made = [r for r in new if r["op"] == "C_GenerateKeyPair" and r["result"] == "CKR_OK"]
    assert len(made) == 4  # two key pairs, two objects each
    gone = [r for r in new if r["op"] == "C_DestroyObject" and r["result"] == "CKR_OK"]
    assert len(gone) == 4


def _guess_handles(path: str, pin: str) -> dict[str, Any]:
    c = raw(path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    c.call(C_Login, [s, CKU_USER, pin.encode()])
    mine = find(c, s, [])
    req = [AttrRequest(CKA_LABEL, 64)]
    guessed = {h: rv_of(c, C_GetAttributeValue, [s, h, req])
               for h in range(1, 400) if h not in mine}
    by_label = find(c, s, [Attribute(CKA_LABEL, b"team-b-key", 10)])
    return {"mine": mine, "guessed": guessed, "by_label": by_label}


def test_guessing_handles_reaches_nothing(env: dict[str, Any]) -> None:
    res = as_uid(A, _guess_handles, env["gw"].path, env["pin"])
    assert set(res["guessed"].values()) == {ckr.OBJECT_HANDLE_INVALID}
    assert res["by_label"] == []  # B's key does not exist for A
    # and for B its own key is there
    res_b = as_uid(B, _guess_handles, env["gw"].path, env["pin"])
    assert len(res_b["by_label"]) == 2


# ---------------------------------------------------------------- read-only and officers


def _readonly_probe(path: str, pin: str) -> dict[str, int]:
    c = raw(path)
    slot = slot_of(c, "shared")
    flags = c.call(C_GetTokenInfo, [slot])[4]
    rw = rv_of(c, C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    c.call(C_Login, [s, CKU_USER, pin.encode()])
    keys = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)])
    data_obj = [Attribute(CKA_CLASS, 0, 8), Attribute(1, 1, 1),
                Attribute(CKA_LABEL, b"ro-data", 7)]
    return {
        "flags": flags, "rw": rw, "keys": len(keys),
        "create": rv_of(c, C_CreateObject, [s, data_obj]),
        "destroy": rv_of(c, C_DestroyObject, [s, keys[0]]),
        "sign": rv_of(c, C_SignInit, [s, Mechanism(CKM_ECDSA, None), keys[0]]),
    }


def test_readonly_identity_cannot_create_or_destroy_but_can_use_keys(
    env: dict[str, Any],
) -> None:
    before = len(audit_records(env))
    res = as_uid(RO, _readonly_probe, env["gw"].path, env["pin"])
    assert res["flags"] & 0x2  # CKF_WRITE_PROTECTED
    assert res["rw"] == ckr.TOKEN_WRITE_PROTECTED
    assert res["keys"] >= 2
    assert res["create"] == ckr.TOKEN_WRITE_PROTECTED
    assert res["destroy"] == ckr.TOKEN_WRITE_PROTECTED
    assert res["sign"] in (ckr.OK, ckr.KEY_TYPE_INCONSISTENT)  # allowed by policy
    r = tool_as(RO, env["gw"], "--token-label", "shared", "--login", "--pin", env["pin"],
                "--keypairgen", "--key-type", "EC:prime256v1", "--label", "nope")
    assert r.returncode != 0 and "CKR_TOKEN_WRITE_PROTECTED" in r.stdout + r.stderr
    denials = [r for r in audit_records(env)[before:] if "denied" in r]
    # RW session, create, destroy (raw) + RW session (pkcs11-tool): one record each
    assert len(denials) == 4, denials
    assert {d["rule"] for d in denials} == {"auditors"}
    assert "\"rule\": \"auditors\"" in env["gw"].log()


def _officer_probe(path: str, so_pin: str) -> dict[str, int]:
    c = raw(path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    return {
        "init_token": rv_of(c, C_InitToken, [slot, so_pin.encode(), b"x".ljust(32)]),
        "so_login": rv_of(c, C_Login, [s, CKU_SO, so_pin.encode()]),
        "init_pin": rv_of(c, C_InitPIN, [s, b"123456"]),
    }


def test_non_officer_cannot_init_token_or_log_in_as_so(env: dict[str, Any]) -> None:
    res = as_uid(A, _officer_probe, env["gw"].path, env["so_pin"])
    assert res == {"init_token": ckr.ACTION_PROHIBITED, "so_login": ckr.USER_TYPE_INVALID,
                   "init_pin": ckr.ACTION_PROHIBITED}
    # the officer may: the refusal above is policy, not the token
    c = raw(env["gw"].path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    assert rv_of(c, C_Login, [s, CKU_SO, env["so_pin"].encode()]) == ckr.OK
    c.call(C_Logout, [s])


# ---------------------------------------------------------------- PIN modes


def _mapped_login(path: str, pins: list[str]) -> list[int]:
    c = raw(path)
    slot = slot_of(c, "mapped")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    out = []
    for p in pins:
        rv = rv_of(c, C_Login, [s, CKU_USER, p.encode()])
        out.append(rv)
        if rv == ckr.OK:
            keys = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)])
            # ECDSA needs an EC key: another family's is refused before the module
            ec = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8),
                             Attribute(CKA_KEY_TYPE, CKK_EC, 8)])
            c.call(C_SignInit, [s, Mechanism(CKM_ECDSA, None), ec[0]]) if ec else None
            out.append(len(keys))
            c.call(C_Logout, [s])
    return out


def test_mapped_pins_are_per_identity_and_the_backend_pin_never_shows(
    env: dict[str, Any],
) -> None:
    gw = env["gw"]
    # A logs in with its own PIN (not the backend's) and sees the private keys
    assert as_uid(A, _mapped_login, gw.path, [A_PIN]) == [ckr.OK, 2]
    # the backend's real PIN is not a client PIN
    assert as_uid(A, _mapped_login, gw.path, [BACKEND_PIN]) == [ckr.PIN_INCORRECT]
    # root (an officer, but with no mapped PIN) cannot log in either
    assert _mapped_login(gw.path, [A_PIN]) == [ckr.PIN_INCORRECT]
    # pkcs11-tool signs with the mapped PIN
    r = tool_as(A, gw, "--token-label", "mapped", "--login", "--pin", A_PIN, "-O",
                "--type", "privkey")
    assert "label:      ec1\n" in ok(r)
    # throttling: three wrong PINs lock the identity out, even for the right PIN
    res = as_uid(A, _mapped_login, gw.path, ["bad1", "bad2", "bad3", A_PIN])
    assert res == [ckr.PIN_INCORRECT] * 3 + [ckr.PIN_LOCKED]
    time.sleep(2.2)
    assert as_uid(A, _mapped_login, gw.path, [A_PIN]) == [ckr.OK, 2]
    # the backend PIN is in no log line, no status output, no audit record
    status = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--config",
                             str(env["cfg"])], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0 and "mapped" in status.stdout
    for text in (gw.log(), status.stdout, status.stderr, env["audit"].read_text(),
                 r.stdout, r.stderr):
        assert BACKEND_PIN not in text and A_PIN not in text


def _none_mode(path: str) -> dict[str, Any]:
    c = raw(path)
    slot = slot_of(c, "nopin")
    flags = c.call(C_GetTokenInfo, [slot])[4]
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    before = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)])
    rv = rv_of(c, C_Login, [s, CKU_USER, b""])
    after = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)])
    sign = rv_of(c, C_SignInit, [s, Mechanism(CKM_ECDSA, None), after[0]]) if after else -1
    return {"flags": flags, "before": len(before), "login": rv, "after": len(after),
            "sign": sign}


def test_pin_mode_none_identity_suffices(env: dict[str, Any]) -> None:
    res = as_uid(A, _none_mode, env["gw"].path)
    assert res["flags"] & 0x100  # CKF_PROTECTED_AUTHENTICATION_PATH
    assert res == {"flags": res["flags"], "before": 0, "login": ckr.OK, "after": 2,
                   "sign": res["sign"]}
    assert res["sign"] in (ckr.OK, ckr.KEY_TYPE_INCONSISTENT)


def test_unused_imports_are_real_calls() -> None:
    # the RPC ids used above, checked against the codec's table
    from p11gate.codec.calls import CALLS_BY_NAME as N

    assert (N["C_FindObjectsInit"].id, N["C_FindObjects"].id, N["C_FindObjectsFinal"].id) == (
        C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal)


def test_session_objects_belong_to_the_connection_that_made_them(env: dict[str, Any]) -> None:
    a, b = raw(env["gw"].path), raw(env["gw"].path)
    slot = slot_of(a, "shared")
    (sa,) = a.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    (sb,) = b.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    label = b"session-data-of-a"
    template = [Attribute(CKA_CLASS, 0, 8), Attribute(1, 0, 1),  # CKA_TOKEN = FALSE
                Attribute(2, 0, 1),  # CKA_PRIVATE = FALSE (no one is logged in)
                Attribute(CKA_LABEL, label, len(label))]
    (h,) = a.call(C_CreateObject, [sa, template])
    query = [Attribute(CKA_LABEL, label, len(label))]
    assert find(a, sa, query) == [h]
    assert find(b, sb, query) == []  # another application's session object
    a.call(C_DestroyObject, [sa, h])
    assert find(a, sa, query) == []


def _prefixed_tenant(path: str, pin: str) -> dict[str, Any]:
    c = raw(path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    c.call(C_Login, [s, CKU_USER, pin.encode()])

    def data(label: bytes) -> list[Attribute]:
        return [Attribute(CKA_CLASS, 0, 8), Attribute(1, 1, 1),  # a token data object
                Attribute(CKA_LABEL, label, len(label))]

    inside = rv_of(c, C_CreateObject, [s, data(b"team-c/notes")])
    outside = rv_of(c, C_CreateObject, [s, data(b"elsewhere")])
    seen = []
    for h in find(c, s, []):
        (attrs, _) = c.call(C_GetAttributeValue, [s, h, [AttrRequest(CKA_LABEL, 64)]])
        seen.append(attrs[0].value.decode())
    return {"inside": inside, "outside": outside, "seen": sorted(seen)}


def test_prefix_namespace_confines_creation_and_visibility(env: dict[str, Any]) -> None:
    res = as_uid(PREFIXED, _prefixed_tenant, env["gw"].path, env["pin"])
    assert res["inside"] == ckr.OK
    assert res["outside"] == ckr.TEMPLATE_INCONSISTENT
    assert res["seen"] == ["team-c/notes"]  # nothing of A's, B's or the unowned keys
    # the refused object was undone, not left behind on the token
    c = raw(env["gw"].path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    c.call(C_Login, [s, CKU_USER, env["pin"].encode()])
    assert find(c, s, [Attribute(CKA_LABEL, b"elsewhere", 9)]) == []
    assert len(find(c, s, [Attribute(CKA_LABEL, b"team-c/notes", 12)])) == 1

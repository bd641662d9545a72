"""Layered soft tokens behind a real gateway, with clients of three uids.

An administrator (uid ADMIN, ``managed`` rw, no layer 0) publishes a certificate and a
key pair into the shared ``managed`` layer through python-pkcs11 and p11-kit-client.so;
member A holds ``managed`` as ``cow``, member B as ``ro``; both have a layer 0 of their
own. Checked: both members see what was published, each sees only its own layer 0, B
cannot change or destroy ``managed`` (python-pkcs11 and raw frames), A's change to the
certificate is a private copy (B and the administrator still see the original), a key
that may not be copied stays where it is, and the token is PIN-less.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11  # imported before the fork: other uids cannot read the interpreter's files
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute as A_
from pkcs11 import CertificateType, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters
from tests.gateway_proc import CLIENT_MODULE, Gateway, rv_of, wait_for
from tests.policy.tenants import (
    CKF_RW,
    CKF_SERIAL,
    CKU_USER,
    C_DestroyObject,
    C_GetTokenInfo,
    C_Login,
    C_OpenSession,
    as_uid,
    find,
    raw,
    remove,
    shared_socket_dir,
    slot_of,
)

from p11gate.admin import query
from p11gate.codec import Attribute, ckr

pytestmark = pytest.mark.skipif(not Path(CLIENT_MODULE).exists() or os.geteuid() != 0,
                                reason="needs p11-kit-client.so and root (to be other uids)")

ADMIN, A, B = 1021, 1022, 1023
C_SetAttributeValue = 25
CKA_CLASS, CKA_LABEL = 0x0, 0x3
CKO_CERTIFICATE, CKO_PRIVATE_KEY = 1, 3
CKF_PROTECTED_AUTHENTICATION_PATH = 0x100
CERT_LABEL = "team-cert"


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "team service")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("layers")
    for name, pin in (("so.pin", "layer-so-pin-1"), ("user.pin", "layer-user-pin-1")):
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
name = "team"
type = "soft"
init_so_pin_file = "{base / 'so.pin'}"
init_user_pin_file = "{base / 'user.pin'}"
layers = [{{ name = "managed", path = "{base / 'managed.db'}" }}]
own_layer_dir = "{base / 'own'}"

[[token]]
name = "team"
backend = "team"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
own_layer = ["cow-member", "ro-member"]
layers = [{{ layer = "managed", grant = [
    {{ rule = "admin", access = "rw" }},
    {{ rule = "cow-member", access = "cow" }},
    {{ rule = "ro-member", access = "ro" }} ] }}]

[[rule]]
name = "admin"
uid = [{ADMIN}]
tokens = ["team"]

[[rule]]
name = "cow-member"
uid = [{A}]
tokens = ["team"]

[[rule]]
name = "ro-member"
uid = [{B}]
tokens = ["team"]
""")
    gw = Gateway(cfg)
    env = {"gw": gw, "base": base, "path": gw.path}
    try:
        yield env
    finally:
        env["gw"].stop()  # the one running now: a test restarts it
        remove(sockdir)


# ---------------------------------------------------------------- clients (in a child)


def _session(path: str) -> Any:
    os.environ["P11_KIT_SERVER_ADDRESS"] = f"unix:path={path}"
    tok = pkcs11.lib(CLIENT_MODULE).get_token(token_label="team")
    return tok.open(user_pin=pkcs11.PROTECTED_AUTH, rw=True)


def _publish(path: str, der: bytes) -> list[str]:
    with _session(path) as s:
        s.create_object({A_.CLASS: ObjectClass.CERTIFICATE,
                         A_.CERTIFICATE_TYPE: CertificateType.X_509, A_.VALUE: der,
                         A_.LABEL: CERT_LABEL, A_.ID: b"\x42", A_.TOKEN: True,
                         A_.COPYABLE: True})
        params = s.create_domain_parameters(
            KeyType.EC, {A_.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        params.generate_keypair(store=True, label="team-key", id=b"\x42")
        return sorted(o[A_.LABEL] for o in s.get_objects({}))


def _labels(path: str) -> list[str]:
    with _session(path) as s:
        return sorted(o[A_.LABEL] for o in s.get_objects({}))


def _sign_with_managed_key(path: str, msg: bytes) -> tuple[bytes, bytes]:
    """(EC point, signature of sha256(msg)) with the published key."""
    with _session(path) as s:
        priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="team-key")
        pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, label="team-key")
        sig = priv.sign(hashlib.sha256(msg).digest(), mechanism=pkcs11.Mechanism.ECDSA)
        return pub[A_.EC_POINT], sig


def _make_own(path: str, label: str) -> list[str]:
    with _session(path) as s:
        s.create_object({A_.CLASS: ObjectClass.DATA, A_.LABEL: label, A_.TOKEN: True,
                         A_.VALUE: b"mine"})
        return sorted(o[A_.LABEL] for o in s.get_objects({}))


def _relabel_cert(path: str, new: str) -> str:
    with _session(path) as s:
        (cert,) = list(s.get_objects({A_.CLASS: ObjectClass.CERTIFICATE}))
        try:
            cert[A_.LABEL] = new
        except pkcs11.exceptions.PKCS11Error as e:
            return type(e).__name__
        certs = list(s.get_objects({A_.CLASS: ObjectClass.CERTIFICATE}))
        return ",".join(c[A_.LABEL] for c in certs)


def _raw_changes(path: str, destroy_cert: bool = False) -> dict[str, int]:
    """Raw frames on managed objects: relabel and destroy the certificate, relabel the
    private key."""
    c = raw(path)
    slot = slot_of(c, "team")
    (s,) = c.call(C_OpenSession, [slot, CKF_RW | CKF_SERIAL])
    out = {"login": rv_of(c, C_Login, [s, CKU_USER, None])}
    (cert,) = find(c, s, [Attribute(CKA_CLASS, CKO_CERTIFICATE, 8)])
    (key,) = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8)])
    new = [Attribute(CKA_LABEL, b"raw-renamed", 11)]
    out["set_cert"] = rv_of(c, C_SetAttributeValue, [s, cert, new])
    out["set_key"] = rv_of(c, C_SetAttributeValue, [s, key, new])
    out["destroy_key"] = rv_of(c, C_DestroyObject, [s, key])
    if destroy_cert:
        out["destroy_cert"] = rv_of(c, C_DestroyObject, [s, cert])
    info = c.call(C_GetTokenInfo, [slot])
    out["flags"] = int(info[4])
    c.close()
    return out


def _pin_modes(path: str) -> dict[str, int]:
    c = raw(path)
    slot = slot_of(c, "team")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    out = {"null": rv_of(c, C_Login, [s, CKU_USER, None])}
    c.call(19, [s])  # C_Logout
    out["any"] = rv_of(c, C_Login, [s, CKU_USER, b"whatever"])
    c.close()
    return out


# ---------------------------------------------------------------- tests, in order


def test_published_objects_are_seen_by_both_members(env: dict[str, Any]) -> None:
    labels = as_uid(ADMIN, _publish, env["path"], _certificate())
    assert labels == [CERT_LABEL, "team-key", "team-key"]
    assert as_uid(A, _labels, env["path"]) == [CERT_LABEL, "team-key", "team-key"]
    assert as_uid(B, _labels, env["path"]) == [CERT_LABEL, "team-key", "team-key"]


def test_both_members_can_use_the_published_key(env: dict[str, Any]) -> None:
    for uid in (A, B):
        point, sig = as_uid(uid, _sign_with_managed_key, env["path"], b"from %d" % uid)
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        key.verify(encode_dss_signature(r, s), b"from %d" % uid, ec.ECDSA(hashes.SHA256()))


def test_each_member_sees_only_its_own_layer_0(env: dict[str, Any]) -> None:
    assert as_uid(A, _make_own, env["path"], "a-own") == [
        "a-own", CERT_LABEL, "team-key", "team-key"]
    assert as_uid(B, _make_own, env["path"], "b-own") == [
        "b-own", CERT_LABEL, "team-key", "team-key"]
    assert as_uid(A, _labels, env["path"]) == ["a-own", CERT_LABEL, "team-key", "team-key"]
    # the administrator has no layer 0: its writes went to managed, members' did not
    assert as_uid(ADMIN, _labels, env["path"]) == [CERT_LABEL, "team-key", "team-key"]
    assert len(list((env["base"] / "own").glob("*.db"))) == 2


def test_a_read_only_member_cannot_change_managed(env: dict[str, Any]) -> None:
    # (python-pkcs11 has no class of its own for CKR_ACTION_PROHIBITED: the raw frames
    # below check the code)
    assert as_uid(B, _relabel_cert, env["path"], "b-was-here") == "PKCS11Error"
    res = as_uid(B, _raw_changes, env["path"], True)
    assert res["login"] == ckr.OK
    assert res["destroy_cert"] == ckr.ACTION_PROHIBITED
    assert res["set_cert"] == ckr.ACTION_PROHIBITED
    assert res["set_key"] == ckr.ACTION_PROHIBITED
    assert res["destroy_key"] == ckr.ACTION_PROHIBITED
    assert as_uid(ADMIN, _labels, env["path"]) == [CERT_LABEL, "team-key", "team-key"]


def test_a_cow_change_stays_private(env: dict[str, Any]) -> None:
    # one certificate, relabelled, for A (the copy shadows the original)
    assert as_uid(A, _relabel_cert, env["path"], "a-label") == "a-label"
    assert as_uid(A, _labels, env["path"]) == ["a-label", "a-own", "team-key", "team-key"]
    assert as_uid(B, _labels, env["path"]) == ["b-own", CERT_LABEL, "team-key", "team-key"]
    assert as_uid(ADMIN, _labels, env["path"]) == [CERT_LABEL, "team-key", "team-key"]
    # a key that may not be copied (not CKA_COPYABLE, never extractable) stays put,
    # and a cow layer is no licence to destroy
    res = as_uid(A, _raw_changes, env["path"])
    assert res["set_cert"] == ckr.OK  # A's own copy, now in its layer 0
    assert res["set_key"] == ckr.ACTION_PROHIBITED
    assert res["destroy_key"] == ckr.ACTION_PROHIBITED
    assert as_uid(B, _labels, env["path"]) == ["b-own", CERT_LABEL, "team-key", "team-key"]


def test_the_token_is_pin_less(env: dict[str, Any]) -> None:
    res = as_uid(A, _raw_changes, env["path"])
    assert res["flags"] & CKF_PROTECTED_AUTHENTICATION_PATH
    # NULL PIN (protected path) logs in as the identity; a PIN given is ignored
    assert as_uid(B, _pin_modes, env["path"]) == {"null": ckr.OK, "any": ckr.OK}


def _held_session(path: str, ready: Any, go: Any) -> list[int]:
    """A session kept open (and logged in) while the parent reloads the gateway."""
    c = raw(path)
    slot = slot_of(c, "team")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    c.call(C_Login, [s, CKU_USER, None])
    before = len(find(c, s, []))
    ready.set()
    go.wait(60)
    after = len(find(c, s, []))
    c.close()
    return [before, after]


def test_a_reload_keeps_open_sessions_of_layered_tokens(env: dict[str, Any]) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    done: list[Any] = []
    th = threading.Thread(target=lambda: done.append(
        as_uid(A, _held_session, env["path"], ready, go)))
    th.start()
    assert ready.wait(60)
    # a change made in place (PIN bounds) and a reload
    cfg = env["base"] / "p11gate.toml"
    cfg.write_text(cfg.read_text().replace('pin_mode = "none"',
                                           'pin_mode = "none"\npin_lockout = 7.0'))
    admin = str(env["base"] / "state" / "admin.sock")
    before = query(admin)["reloads"]
    os.kill(env["gw"].proc.pid, signal.SIGHUP)
    assert wait_for(lambda: query(admin)["reloads"] == before + 1, timeout=30)
    go.set()
    th.join(90)
    assert done == [[4, 4]]  # the session lived through the reload, same objects


def test_layers_survive_a_restart(env: dict[str, Any]) -> None:
    env["gw"].stop()
    env["gw"] = gw = Gateway(env["base"] / "p11gate.toml")
    assert gw.path == env["path"]
    assert as_uid(A, _labels, env["path"]) == ["a-own", "raw-renamed", "team-key",
                                                "team-key"]
    assert as_uid(B, _labels, env["path"]) == ["b-own", CERT_LABEL, "team-key", "team-key"]


def test_pkcs11_tool_lists_the_union(env: dict[str, Any]) -> None:
    if shutil.which("pkcs11-tool") is None:
        pytest.fail("pkcs11-tool is installed on this machine's test image")
    from tests.policy.tenants import tool_as

    r = tool_as(B, env["gw"], "--token-label", "team", "--list-objects", "--login",
                "--pin", "")
    assert r.returncode == 0, r.stderr
    assert f"label:      {CERT_LABEL}" in r.stdout and "b-own" in r.stdout
    assert "a-own" not in r.stdout

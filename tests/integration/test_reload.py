"""Configuration reload of a running gateway (SIGHUP and `p11gate reload`), with real
SoftHSM tokens and a raw RPC client whose connection stays open throughout."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_ID,
    CKF_SERIAL,
    CKM_ECDSA,
    CKO_PRIVATE_KEY,
    CKU_USER,
    ID,
    s,
    u,
)
from tests.adversarial.tls_pki import Authority, _pem, _write_key
from tests.gateway_proc import Gateway, RawClient, rv_of, wait_for
from tests.softhsm import make_token, requires_softhsm

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr

pytestmark = requires_softhsm

UID = os.getuid()
C_GetInfo, C_GetSlotList, C_GetTokenInfo = ID("C_GetInfo"), ID("C_GetSlotList"), ID(
    "C_GetTokenInfo")
C_OpenSession, C_Login, C_SignInit, C_Sign = (ID("C_OpenSession"), ID("C_Login"),
                                               ID("C_SignInit"), ID("C_Sign"))
USER_RULE = f'[[rule]]\nname = "me"\nuid = [{UID}]\ntokens = ["*"]\nrole = "user"\n'


def signing_token(name: str = "signing", backend: str = "softhsm",
                  label: str = "anchor") -> str:
    return (f'[[token]]\nname = "{name}"\nbackend = "{backend}"\n'
            f'select = {{ label = "{label}" }}\n')


def write(base: Path, tok: dict[str, Any], *, rules: str = USER_RULE,
          tokens: str | None = None, log_level: str = "info", backends: str = "",
          head: str = "", tail: str = "") -> Path:
    cfg = base / "p11gate.toml"
    listen = head or f'listen = "unix:path={base / "p11gate.sock"}"'
    cfg.write_text(f"""
[server]
{listen}
state_dir = "{base / 'state'}"
log_format = "json"
log_level = "{log_level}"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
call_timeout = 10.0
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}
{backends}
{tokens if tokens is not None else signing_token()}
{rules}
{tail}
""")
    return cfg


def status(base: Path) -> dict[str, Any]:
    return query(str(base / "state" / "admin.sock"))


def hup_and_wait(gw: Gateway, base: Path, key: str = "reloads") -> None:
    """SIGHUP, then wait until the reload is counted (done or refused)."""
    before = status(base)[key]
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: status(base)[key] == before + 1, timeout=30), gw.log()[-2000:]


def reload_cmd(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", "reload", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=120)


def session_with_key(c: RawClient, pin: str, slot: int | None = None) -> tuple[int, int]:
    if slot is None:
        (slot,) = c.call(C_GetSlotList, [1, 16])[0]
    (sess,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
    c.call(C_Login, [sess, CKU_USER, pin.encode()])
    (key,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_ID, b"\x01")])
    return sess, key


def sign_rv(c: RawClient, sess: int, key: int) -> int:
    rv = rv_of(c, C_SignInit, [sess, Mechanism(CKM_ECDSA, None), key])
    if rv != ckr.OK:
        return rv
    (sig,) = c.call(C_Sign, [sess, b"\x07" * 32, 64])
    assert len(sig) == 64  # a real P-256 signature
    return ckr.OK


@pytest.fixture
def two_tokens(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    tok = make_token(tmp_path / "hsm")  # "anchor", with keys
    make_token(tmp_path / "hsm", label="spare", keys=False)  # not configured at first
    yield tmp_path, tok


def test_policy_changes_apply_to_the_next_call_and_bad_files_change_nothing(
        two_tokens: tuple[Path, dict[str, Any]]) -> None:
    base, tok = two_tokens
    cfg = write(base, tok)
    gw = Gateway(cfg)
    try:
        c = RawClient(gw.path)
        c.initialize()
        sess, key = session_with_key(c, tok["pin"])
        assert sign_rv(c, sess, key) == ckr.OK

        # the grant keeps the token but loses "use": the same session is refused
        write(base, tok, rules=USER_RULE.replace('role = "user"', 'allow = ["create"]'))
        hup_and_wait(gw, base)
        assert sign_rv(c, sess, key) == ckr.ACTION_PROHIBITED
        assert any(r.get("msg") == "denied by policy" and r.get("rule") == "me"
                   for r in gw.records())

        # granted again: the next call on the same session works
        write(base, tok)
        result = reload_cmd(cfg)
        assert result.returncode == 0, result.stderr
        assert "configuration reloaded" in result.stdout
        assert sign_rv(c, sess, key) == ckr.OK

        # a syntax error: refused, the reason logged, nothing changes
        cfg.write_text(cfg.read_text() + "\n[[rule]\n")
        hup_and_wait(gw, base, "reload_failures")
        refused = [r for r in gw.records() if r.get("msg", "").startswith(
            "configuration reload refused")]
        assert len(refused) == 1 and str(cfg) in refused[0]["reason"], refused
        assert sign_rv(c, sess, key) == ckr.OK
        # semantically wrong (a rule naming no token): `p11gate reload` says why, exit 1
        write(base, tok, rules=USER_RULE.replace('["*"]', '["nosuch"]'))
        result = reload_cmd(cfg)
        assert result.returncode == 1
        assert "no token named 'nosuch'" in result.stderr, result.stderr
        assert sign_rv(c, sess, key) == ckr.OK
        st = status(base)
        assert (st["reloads"], st["reload_failures"]) == (2, 2)
        assert "no token named 'nosuch'" in [r for r in gw.records() if r.get(
            "msg", "").startswith("configuration reload refused")][-1]["reason"]

        # the rule now names another uid: this client loses the token on its next call,
        # its connection stays open
        write(base, tok, rules=USER_RULE.replace(f"[{UID}]", f"[{UID + 4242}]"))
        hup_and_wait(gw, base)
        assert sign_rv(c, sess, key) == ckr.SESSION_HANDLE_INVALID
        assert c.call(C_GetSlotList, [1, 16])[0] == []
        assert c.call(C_GetInfo, [])  # the connection still serves calls
        assert st["connections"] == status(base)["connections"] == 1
        done = [r for r in gw.records() if r.get("msg") == "configuration reloaded"]
        assert "grants_revoked" in done[-1]["changes"] and "rules" in done[-1]["changes"]
        assert tok["pin"] not in gw.log()
        c.close()
    finally:
        assert gw.stop() == 0


def test_tokens_added_and_removed_and_log_level(
        two_tokens: tuple[Path, dict[str, Any]]) -> None:
    base, tok = two_tokens
    cfg = write(base, tok)
    gw = Gateway(cfg)
    try:
        c = RawClient(gw.path)
        c.initialize()
        assert len(c.call(C_GetSlotList, [1, 16])[0]) == 1
        # a token on the running back end and one on a new back end
        second = (f'[[backend]]\nname = "second"\nmodule = "{tok["module"]}"\n'
                  f'env = {{ SOFTHSM2_CONF = "{tok["conf"]}" }}\n')
        # and a pool of the two back ends (its share book counts both members)
        pool = ('[[pool]]\nname = "ha"\nmembers = [{ backend = "softhsm", select = '
                '{ label = "spare" } }, { backend = "second", select = { label = '
                '"spare" } }]\n')
        four = (signing_token() + signing_token("spare", label="spare")
                + signing_token("again", backend="second")
                + '[[token]]\nname = "pooled"\nbackend = "ha"\n')
        write(base, tok, tokens=four, backends=second + pool)
        hup_and_wait(gw, base)
        (slots,) = c.call(C_GetSlotList, [1, 16])
        labels = {c.call(C_GetTokenInfo, [x])[0].rstrip(b" ") for x in slots}
        assert labels == {b"signing", b"spare", b"again", b"pooled"}
        st = status(base)
        assert len(st["backends"]) == 2 and [p["name"] for p in st["pools"]] == ["ha"]
        shares = {f["backend"]: f["max_calls_per_identity"] for f in st["fair_share"]}
        # the new pool's share is its two members' added up, not a fallback of 1
        assert shares["ha"] == shares["softhsm"] + shares["second"] > 1, shares
        pooled = next(x for x in slots if c.call(C_GetTokenInfo, [x])[0].startswith(b"pooled"))
        (pooled_sess,) = c.call(C_OpenSession, [pooled, CKF_SERIAL])
        assert rv_of(c, ID("C_GetSessionInfo"), [pooled_sess]) == ckr.OK
        spare = next(x for x in slots if c.call(C_GetTokenInfo, [x])[0].startswith(b"spare"))
        (sess,) = c.call(C_OpenSession, [spare, CKF_SERIAL])
        signing = next(x for x in slots
                       if c.call(C_GetTokenInfo, [x])[0].startswith(b"signing"))
        signing_sess, key = session_with_key(c, tok["pin"], signing)

        # "spare", "pooled", the pool and the second back end removed; log level warning
        write(base, tok, log_level="warning")
        hup_and_wait(gw, base)
        assert rv_of(c, ID("C_GetSessionInfo"), [sess]) == ckr.SESSION_HANDLE_INVALID
        assert rv_of(c, C_GetTokenInfo, [spare]) == ckr.SLOT_ID_INVALID
        assert len(c.call(C_GetSlotList, [1, 16])[0]) == 1
        assert sign_rv(c, signing_sess, key) == ckr.OK  # the kept token is untouched
        st = status(base)
        assert [b["name"] for b in st["backends"]] == ["softhsm"] and st["pools"] == []
        assert rv_of(c, ID("C_GetSessionInfo"), [pooled_sess]) == ckr.SESSION_HANDLE_INVALID
        # at warning level a new connection is not logged at info any more
        connected = sum(r.get("msg") == "client connected" for r in gw.records())
        RawClient(gw.path).close()
        assert wait_for(lambda: status(base)["connections"] == 1)
        assert sum(r.get("msg") == "client connected" for r in gw.records()) == connected
        write(base, tok, log_level="info")
        hup_and_wait(gw, base)
        RawClient(gw.path).close()
        assert wait_for(lambda: sum(r.get("msg") == "client connected"
                                    for r in gw.records()) == connected + 1)
        c.close()
    finally:
        assert gw.stop() == 0


def test_calls_go_on_through_twenty_reloads(two_tokens: tuple[Path, dict[str, Any]]) -> None:
    base, tok = two_tokens
    cfg = write(base, tok)
    gw = Gateway(cfg)
    errors: list[str] = []
    calls = [0]
    stop = threading.Event()
    try:
        c = RawClient(gw.path)
        c.initialize()
        sess, key = session_with_key(c, tok["pin"])

        def client() -> None:
            while not stop.is_set():
                try:
                    rv = sign_rv(c, sess, key)
                    if rv != ckr.OK:
                        errors.append(ckr.name(rv))
                    c.call(C_GetSlotList, [1, 16])
                    calls[0] += 2
                except Exception as e:  # any failure is the finding
                    errors.append(repr(e))
                    return

        t = threading.Thread(target=client)
        t.start()
        for i in range(20):
            # alternate two valid files that keep this client's grant
            name = f"me{i % 2}"
            write(base, tok, rules=USER_RULE.replace('"me"', f'"{name}"'),
                  log_level=("info", "debug")[i % 2])
            hup_and_wait(gw, base)
        stop.set()
        t.join(30)
        assert errors == []
        assert calls[0] >= 40, calls  # the client really ran through the reloads
        st = status(base)
        assert (st["reloads"], st["reload_failures"]) == (20, 0)
        assert gw.alive()
        c.close()
    finally:
        stop.set()
        assert gw.stop() == 0


# --- TLS: a new handshake sees the new certificate ----------------------------------


def _server_cert(ca: Authority, d: Path, n: int) -> tuple[Path, Path]:
    cert, key = ca.issue("gateway", server=True)
    (d / f"server{n}.pem").write_bytes(_pem(cert))
    _write_key(key, d / f"server{n}.key")
    return d / f"server{n}.pem", d / f"server{n}.key"


def _tls_client(port: int, pki: Path) -> tuple[RawClient, x509.Certificate]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki / "ca.pem")
    ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    c = RawClient(None, sock=tls)
    c.initialize()
    return c, x509.load_der_x509_certificate(der)


def test_tls_certificate_rotation(tmp_path: Path) -> None:
    tok = make_token(tmp_path / "hsm")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = Authority("Reload CA")
    (pki / "ca.pem").write_bytes(_pem(ca.cert))
    ccert, ckey = ca.issue("app")
    (pki / "client.pem").write_bytes(_pem(ccert))
    _write_key(ckey, pki / "client.key")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    listen = (f'listen = ["unix:path={tmp_path / "p11gate.sock"}", '
              f'"tls:127.0.0.1:{port}"]')

    def tls_section(n: int) -> str:
        cert, key = _server_cert(ca, pki, n)
        return f'[tls]\ncert = "{cert}"\nkey = "{key}"\nclient_ca = "{pki / "ca.pem"}"\n'

    rule = USER_RULE + '\n[[rule]]\nname = "app"\nsubject = ["CN=app,*"]\ntokens = ["*"]\n'
    cfg = write(tmp_path, tok, head=listen, rules=rule, tail=tls_section(1))
    gw = Gateway(cfg)
    try:
        old, first = _tls_client(port, pki)
        assert len(old.call(C_GetSlotList, [1, 16])[0]) == 1
        write(tmp_path, tok, head=listen, rules=rule, tail=tls_section(2))
        result = reload_cmd(cfg)
        assert result.returncode == 0, result.stderr
        new, second = _tls_client(port, pki)
        assert second.serial_number != first.serial_number
        assert second.serial_number == x509.load_pem_x509_certificate(
            (pki / "server2.pem").read_bytes()).serial_number
        # the old connection goes on, under its old session keys
        assert len(old.call(C_GetSlotList, [1, 16])[0]) == 1
        assert len(new.call(C_GetSlotList, [1, 16])[0]) == 1
        # a key that does not match the certificate: refused, the old context serves
        (pki / "server3.pem").write_bytes((pki / "server1.pem").read_bytes())
        (pki / "server3.key").write_bytes((pki / "server2.key").read_bytes())
        bad = (f'[tls]\ncert = "{pki / "server3.pem"}"\nkey = "{pki / "server3.key"}"\n'
               f'client_ca = "{pki / "ca.pem"}"\n')
        write(tmp_path, tok, head=listen, rules=rule, tail=bad)
        result = reload_cmd(cfg)
        assert result.returncode == 1, result.stderr
        assert "tls.key" in result.stderr and "is not the key of the certificate" in result.stderr
        third, seen = _tls_client(port, pki)
        assert seen.serial_number == second.serial_number
        for c in (old, new, third):
            c.close()
    finally:
        assert gw.stop() == 0


def test_listen_change_needs_a_restart(two_tokens: tuple[Path, dict[str, Any]]) -> None:
    base, tok = two_tokens
    cfg = write(base, tok)
    gw = Gateway(cfg)
    try:
        write(base, tok, head=f'listen = "unix:path={base / "other.sock"}"')
        result = reload_cmd(cfg)
        assert result.returncode == 0
        assert "server.listen changed: needs a restart" in result.stderr
        assert not (base / "other.sock").exists()
        c = RawClient(gw.path)  # the running listener stays
        c.initialize()
        assert len(c.call(C_GetSlotList, [1, 16])[0]) == 1
        c.close()
    finally:
        assert gw.stop() == 0


def test_pin_map_and_limits_change_in_place(two_tokens: tuple[Path, dict[str, Any]]) -> None:
    from p11gate.frontend.pins import hash_pin

    base, tok = two_tokens

    def mapped(pin: str, server: str = "") -> Path:
        tokens = (signing_token() + 'pin_mode = "mapped"\nbackend_pin_env = "HSM_PIN"\n'
                  f'[token.pins]\n"uid:{UID}" = "{hash_pin(pin.encode())}"\n')
        cfg = write(base, tok, tokens=tokens)
        if server:  # more [server] keys
            cfg.write_text(cfg.read_text().replace('log_level = "info"\n',
                                                   f'log_level = "info"\n{server}\n', 1))
        return cfg

    cfg = mapped("first-pin-111")
    gw = Gateway(cfg, env={**os.environ, "HSM_PIN": tok["pin"]})
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slot,) = c.call(C_GetSlotList, [1, 16])[0]
        (s1,) = c.call(C_OpenSession, [slot, CKF_SERIAL])
        assert rv_of(c, C_Login, [s1, CKU_USER, b"first-pin-111"]) == ckr.OK
        c.call(ID("C_Logout"), [s1])
        mapped("second-pin-222", "max_sessions_per_connection = 2")
        hup_and_wait(gw, base)
        changes = [r for r in gw.records() if r.get("msg") == "configuration reloaded"][-1]
        assert changes["changes"]["tokens_updated"] == ["signing"]
        assert changes["changes"]["server"] == ["max_sessions_per_connection"]
        # the same session: the old PIN is wrong now, the new one logs in
        assert rv_of(c, C_Login, [s1, CKU_USER, b"first-pin-111"]) == ckr.PIN_INCORRECT
        assert rv_of(c, C_Login, [s1, CKU_USER, b"second-pin-222"]) == ckr.OK
        # the new session limit applies to the next C_OpenSession
        c.call(C_OpenSession, [slot, CKF_SERIAL])
        assert rv_of(c, C_OpenSession, [slot, CKF_SERIAL]) == ckr.SESSION_COUNT
        assert "first-pin-111" not in gw.log() and "second-pin-222" not in gw.log()
        c.close()
    finally:
        assert gw.stop() == 0

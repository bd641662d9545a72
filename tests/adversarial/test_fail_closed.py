"""Issue 10 point 7: the registry and the audit log fail closed.

Real gateway, real SoftHSM, a namespaced tenant (uid 1001, ``namespace = { owned = true }``)
speaking raw frames. Faults are real: a small tmpfs filled to the last byte (a full
disk), a registry file made immutable with ``chattr +i`` (writes fail even for root),
junk written over the registry file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.fail_closed_env import (
    CKA_LABEL,
    CKM_ECDSA,
    TENANT,
    C_SetAttributeValue,
    fill,
    free_pages,
    gateway_config,
    generate,
    labels_on_token,
    tenant_session,
    tmpfs,
)
from tests.gateway_proc import Gateway, RawClient, rv_of
from tests.policy.tenants import (
    CKF_RW,
    CKF_SERIAL,
    CKU_USER,
    C_CreateObject,
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
)
from tests.softhsm import make_token

from p11gate.codec import (
    Attribute,
    Mechanism,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    encode_request,
)

C_Sign, C_GetSessionInfo = 43, 13
CKS_RW_PUBLIC_SESSION = 2
CKA_CLASS, CKO_PRIVATE_KEY = 0, 3


@pytest.fixture
def hsm(tmp_path: Path) -> dict[str, Any]:
    return make_token(tmp_path / "hsm", label="shared", keys=False)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = shared_socket_dir()
    yield d
    remove(d)


def _generate_all(path: str, pin: str, labels: list[bytes]) -> list[int]:
    c, s = tenant_session(path, pin)
    return [generate(c, s, label, b"\xfc" + label[-1:]) for label in labels]


def _registry_errors(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.records() if r.get("msg") == "registry write failed"]


# ------------------------------------------------------------------ registry: full disk


def test_full_disk_key_pair_is_undone_and_its_labels_stay_free(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    labels = [b"fc-full-1", b"fc-full-2", b"fc-full-3"]
    with tmpfs(tmp_path / "state") as state:
        cfg = gateway_config(tmp_path, hsm, sockdir, state, tmp_path / "audit.jsonl")
        gw = Gateway(cfg)
        try:
            filler = fill(state)
            rvs = as_uid(TENANT, _generate_all, gw.path, hsm["pin"], labels)
            # a full disk: the gateway has no room to record the key pair
            assert rvs == [ckr.DEVICE_MEMORY] * len(labels)
            # ... and so it is not on the token (pkcs11-tool straight on SoftHSM)
            on_token = labels_on_token(hsm)
            assert not [x for x in on_token if x.startswith("fc-full")], on_token
            errors = _registry_errors(gw)
            assert len(errors) == len(labels)  # once per failure, with file and reason
            assert all(e["path"] == str(state / "registry.sqlite3") for e in errors)
            assert all("full" in e["error"] for e in errors), errors
            audit = (tmp_path / "audit.jsonl").read_text()
            assert audit.count('"undone":true') == len(labels)
            # space again: the same identities can be made, and are the tenant's
            filler.unlink()
            assert as_uid(TENANT, _generate_all, gw.path, hsm["pin"], labels) == [0] * 3
            on_token = labels_on_token(hsm)
            assert sorted(x for x in on_token if x.startswith("fc-full")) == sorted(
                [lb.decode() for lb in labels] * 2)
            assert gw.alive()
        finally:
            gw.stop()


# ------------------------------------------------------------------ registry: read-only


def _create_data(path: str, pin: str, label: bytes) -> int:
    c, s = tenant_session(path, pin)
    tmpl = [Attribute(CKA_CLASS, 0, 8), Attribute(1, 1, 1),  # a token data object
            Attribute(2, 1, 1), Attribute(CKA_LABEL, label, len(label))]
    try:
        c.call(C_CreateObject, [s, tmpl])
    except ReplyError as e:
        return e.rv
    return 0


def _read_only_probe(path: str, pin: str) -> dict[str, Any]:
    c, s = tenant_session(path, pin)
    gen = generate(c, s, b"fc-ro-new", b"\xfc\x10")
    data = _create_data(path, pin, b"fc-ro-data")
    (keep,) = find(c, s, [Attribute(CKA_LABEL, b"fc-ro-keep", 10)])
    rename = rv_of(c, C_SetAttributeValue,
                   [s, keep, [Attribute(CKA_LABEL, b"fc-ro-renamed", 13)]])
    still = find(c, s, [Attribute(CKA_LABEL, b"fc-ro-keep", 10)])
    return {"gen": gen, "data": data, "rename": rename, "still_mine": still == [keep]}


def test_read_only_registry_creation_and_rename_fail_cleanly(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    state = tmp_path / "state"
    cfg = gateway_config(tmp_path, hsm, sockdir, state, tmp_path / "audit.jsonl")
    gw = Gateway(cfg)
    try:
        assert as_uid(TENANT, _create_data, gw.path, hsm["pin"], b"fc-ro-keep") == 0
    finally:
        gw.stop()
    registry = state / "registry.sqlite3"
    subprocess.run(["chattr", "+i", str(registry)], check=True)  # stops root too
    try:
        gw = Gateway(cfg)
        try:
            res = as_uid(TENANT, _read_only_probe, gw.path, hsm["pin"])
            errors = _registry_errors(gw)
        finally:
            gw.stop()
    finally:
        subprocess.run(["chattr", "-i", str(registry)], check=True)
    assert res == {"gen": ckr.DEVICE_ERROR, "data": ckr.DEVICE_ERROR,
                   "rename": ckr.DEVICE_ERROR, "still_mine": True}
    on_token = labels_on_token(hsm)
    assert "fc-ro-new" not in on_token and "fc-ro-data" not in on_token
    assert "fc-ro-keep" in on_token and "fc-ro-renamed" not in on_token
    assert len(errors) == 3 and all("readonly" in e["error"] for e in errors), errors
    # writable again: the same identities can be made
    gw = Gateway(cfg)
    try:
        assert as_uid(TENANT, _create_data, gw.path, hsm["pin"], b"fc-ro-data") == 0
        assert as_uid(TENANT, _generate_all, gw.path, hsm["pin"], [b"fc-ro-new"]) == [0]
    finally:
        gw.stop()


# ------------------------------------------------------------------ audit on a full disk


def _pipelined(c: RawClient, calls: list[tuple[int, list[Any]]]) -> list[int]:
    """Send several requests back to back before reading any reply: their CK_RVs."""
    frames = b""
    for n, (cid, args) in enumerate(calls):
        frames += build_frame(0x100 + n, encode_request(cid, args, c.dialect), b"client")
    c.send_raw(frames)
    rvs: dict[int, int] = {}
    for _ in calls:
        got = c.recv_frame()
        assert got is not None, "gateway closed the connection"
        code, body = got
        cid, args = calls[code - 0x100]
        try:
            decode_reply(body, c.dialect, cid, args)
            rvs[code] = 0
        except ReplyError as e:
            rvs[code] = e.rv
    return [rvs[0x100 + n] for n in range(len(calls))]


def _logins_and_key_uses(path: str, pin: str, rounds: int) -> dict[str, Any]:
    c = raw(path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    out: dict[str, Any] = {"login": [], "sign_init": [], "sign": [], "state": []}
    for _ in range(rounds):
        rv = rv_of(c, C_Login, [s, CKU_USER, pin.encode()])
        out["login"].append(rv)
        if rv != 0:
            out["state"].append(c.call(C_GetSessionInfo, [s])[1])
            continue
        # (handles to private keys go with the logout: found again each round)
        (key,) = find(c, s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8),
                             Attribute(CKA_LABEL, b"fc-audit", 8)])
        # a hostile client pipelines C_Sign behind C_SignInit: if the init cannot be
        # audited, the sign must not produce a signature
        init, sign = _pipelined(c, [(C_SignInit, [s, Mechanism(CKM_ECDSA), key]),
                                    (C_Sign, [s, b"\x11" * 32, 256])])
        out["sign_init"].append(init)
        out["sign"].append(sign)
        c.call(C_Logout, [s])
    return out


def _audit_run(tmp_path: Path, hsm: dict[str, Any], sockdir: Path,
               required: bool) -> tuple[dict[str, Any], list[dict[str, Any]], Gateway]:
    """60 logins and pipelined key uses with the audit log's disk full, a page freed
    now and then: returns what the tenant saw, the audit records, the gateway."""
    with tmpfs(tmp_path / "auditfs", "256k") as auditfs:
        audit = auditfs / "audit.jsonl"
        cfg = gateway_config(tmp_path, hsm, sockdir, tmp_path / "state", audit,
                             required=required)
        gw = Gateway(cfg)
        try:
            assert as_uid(TENANT, _generate_all, gw.path, hsm["pin"], [b"fc-audit"]) == [0]
            filler = fill(auditfs)
            before = len(audit.read_text().splitlines())
            res: dict[str, Any] = {"login": [], "sign_init": [], "sign": [], "state": []}
            for part in range(3):  # 3 x 20 rounds; a page freed between parts
                got = as_uid(TENANT, _logins_and_key_uses, gw.path, hsm["pin"], 20)
                for k in res:
                    res[k] += got[k]
                if part < 2:
                    free_pages(filler, 1)
            records = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
        except BaseException:
            gw.stop()
            raise
        status = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--json",
                                 "--config", str(cfg)], capture_output=True, text=True, timeout=30)
        res["status"] = json.loads(status.stdout)
    return res, records, gw


def test_required_audit_every_success_is_recorded_and_unrecorded_calls_fail(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    res, records, gw = _audit_run(tmp_path, hsm, sockdir, required=True)
    try:
        logins_ok = res["login"].count(0)
        inits_ok = res["sign_init"].count(0)
        recorded_logins = [r for r in records if r["op"] == "C_Login"]
        recorded_inits = [r for r in records if r["op"] == "C_SignInit"]
        # every success has its record; every call whose record was lost failed
        assert len(recorded_logins) == logins_ok
        assert all(r["result"] == "CKR_OK" and r["identity"].startswith(f"uid={TENANT} ")
                   for r in recorded_logins)
        assert len(recorded_inits) == inits_ok
        failed_logins = [rv for rv in res["login"] if rv != 0]
        assert failed_logins and set(failed_logins) == {ckr.DEVICE_MEMORY}
        assert logins_ok > 0  # pages were freed: some records did fit
        # a login that could not be audited was not granted (passthrough: undone)
        assert res["state"] == [CKS_RW_PUBLIC_SESSION] * len(failed_logins)
        assert res["status"]["tokens"][0]["logged_in_clients"] == 0
        # a key use that could not be audited: the init failed and the pipelined
        # sign found no operation (ended on the backend), never a signature
        for init, sign in zip(res["sign_init"], res["sign"], strict=True):
            if init == 0:
                assert sign == 0
            else:
                assert init == ckr.DEVICE_MEMORY
                assert sign == ckr.OPERATION_NOT_INITIALIZED
        unaudited = len(failed_logins) + res["sign_init"].count(ckr.DEVICE_MEMORY)
        logged = [r for r in gw.records() if r.get("msg") == "cannot write the audit log"]
        assert len(logged) >= unaudited > 0
        assert res["status"]["audit_failures"] >= unaudited
        assert gw.alive()
    finally:
        gw.stop()


def test_audit_not_required_logs_and_goes_on(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    res, records, gw = _audit_run(tmp_path, hsm, sockdir, required=False)
    try:
        assert res["login"] == [0] * 60
        assert res["sign_init"] == [0] * 60 and res["sign"] == [0] * 60
        logged = [r for r in gw.records() if r.get("msg") == "cannot write the audit log"]
        # each record either reached the file or was logged as lost
        assert len(logged) + len(records) == 120
        assert logged and all(r["action"] == "operation goes on" for r in logged)
    finally:
        gw.stop()


# ------------------------------------------------------------------ corrupt registry


def test_corrupt_registry_one_line_in_serve_and_check_config(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    registry = state / "registry.sqlite3"
    registry.write_bytes(b"this is not an SQLite database\n" * 300)
    cfg = gateway_config(tmp_path, hsm, sockdir, state, tmp_path / "audit.jsonl")
    serve = subprocess.run([sys.executable, "-m", "p11gate.cli", "serve", "--config",
                            str(cfg)], capture_output=True, text=True, timeout=60)
    check = subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config",
                            "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    for proc in (serve, check):
        assert proc.returncode == 2, proc
        # warnings about the configuration (JSON log records from serve, "warning:"
        # lines from check-config) may come first; the error itself is one line
        lines = [x for x in proc.stderr.strip().splitlines()
                 if not x.startswith(("{", "warning:"))]
        assert len(lines) == 1, proc.stderr
        assert str(registry) in lines[0] and "not a usable SQLite database" in lines[0]
        assert "move it away" in lines[0]  # the fix
        assert "Traceback" not in proc.stderr
    assert "OK" not in check.stdout
    assert not (sockdir / "gw.sock").exists()
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(str(sockdir / "gw.sock"))


# ------------------------------------------------------------------ mapped PIN override

C_SetPIN = 15
TENANT_PIN, NEW_PIN = "tenant-pin-1", "tenant-pin-2"


def _mapped_config(tmp_path: Path, hsm: dict[str, Any], sockdir: Path) -> Path:
    from p11gate.frontend.pins import hash_pin

    (tmp_path / "backend.pin").write_text(hsm["pin"] + "\n")
    (tmp_path / "backend.pin").chmod(0o600)  # serve refuses a PIN file others can read
    cfg = tmp_path / "mapped.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{tmp_path / 'state'}"
socket_mode = 0o666
log_format = "json"

[audit]
file = "{tmp_path / 'audit.jsonl'}"

[[backend]]
name = "softhsm"
module = "{hsm['module']}"
env = {{ SOFTHSM2_CONF = "{hsm['conf']}" }}

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "{hsm['label']}" }}
pin_mode = "mapped"
backend_pin_file = "{tmp_path / 'backend.pin'}"
pins = {{ "uid:{TENANT}" = "{hash_pin(TENANT_PIN.encode())}" }}

[[rule]]
name = "tenant"
uid = [{TENANT}]
tokens = ["shared"]
""")
    return cfg


def _set_pin(path: str) -> int:
    c, s = tenant_session(path, TENANT_PIN)
    return rv_of(c, C_SetPIN, [s, TENANT_PIN.encode(), NEW_PIN.encode()])


def _login_with(path: str, pin: str) -> int:
    c = raw(path)
    (s,) = c.call(C_OpenSession, [slot_of(c, "shared"), CKF_SERIAL])
    return rv_of(c, C_Login, [s, CKU_USER, pin.encode()])


def test_mapped_pin_change_that_cannot_be_recorded_changes_nothing(
    tmp_path: Path, hsm: dict[str, Any], sockdir: Path
) -> None:
    cfg = _mapped_config(tmp_path, hsm, sockdir)
    Gateway(cfg).stop()  # makes the registry
    registry = tmp_path / "state" / "registry.sqlite3"
    subprocess.run(["chattr", "+i", str(registry)], check=True)
    try:
        gw = Gateway(cfg)
        try:
            rv = as_uid(TENANT, _set_pin, gw.path)
            # the override could not be kept: the old PIN still works, the new one not
            after = (as_uid(TENANT, _login_with, gw.path, TENANT_PIN),
                     as_uid(TENANT, _login_with, gw.path, NEW_PIN))
            errors = _registry_errors(gw)
        finally:
            gw.stop()
    finally:
        subprocess.run(["chattr", "-i", str(registry)], check=True)
    assert rv == ckr.DEVICE_ERROR
    assert after == (0, ckr.PIN_INCORRECT)
    assert len(errors) == 1 and errors[0]["path"] == str(registry)
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["result"] for r in records if r["op"] == "C_SetPIN"] == [
        "PENDING", "CKR_DEVICE_ERROR"]
    # writable again: the change goes through and survives a restart
    gw = Gateway(cfg)
    try:
        assert as_uid(TENANT, _set_pin, gw.path) == 0
    finally:
        gw.stop()
    gw = Gateway(cfg)
    try:
        assert as_uid(TENANT, _login_with, gw.path, NEW_PIN) == 0
    finally:
        gw.stop()

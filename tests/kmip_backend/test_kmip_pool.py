"""A pool of one SoftHSM member and one KMIP member (external replication: the same RSA
key imported into both) signs through either member: with the SoftHSM worker frozen
the KMIP server signs, with the KMIP server down SoftHSM signs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.adversarial.hostile import call, rv, s, u
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, worker_pids
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.pools.members import PIN, key_material, make_member
from tests.softhsm import softhsm_available

from p11gate.codec import Mechanism, ckr

pytestmark = pytest.mark.skipif(not softhsm_available(), reason="needs SoftHSMv2")
MSG = b"signed through the pool"
CKA_CLASS, CKA_ID = 0x0, 0x102


def _sign(gw: Gateway, pin: str) -> int | bytes:
    c = RawClient(gw.path, timeout=30)
    try:
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], 6)
        call(c, "C_Login", sess, 1, pin.encode())
        call(c, "C_FindObjectsInit", sess, [u(CKA_CLASS, 3), s(CKA_ID, b"\x02")])
        (found,) = call(c, "C_FindObjects", sess, 4)
        call(c, "C_FindObjectsFinal", sess)
        assert len(found) == 1
        call(c, "C_SignInit", sess, Mechanism(0x40, None), found[0])
        code = rv(c, "C_Sign", sess, MSG, 0)
        if code != ckr.OK:
            return code
        (sig,) = call(c, "C_Sign", sess, MSG, 512)
        assert isinstance(sig, bytes)
        return sig
    finally:
        c.close()


def _config(base: Path, server: KmipServerProc, softhsm: dict, pin_file: Path,
            store: Path, pool: bool) -> Path:
    """``store``: the state store both gateways share (the KMIP identity map is in it)."""
    kmip = server.backend_toml("kmip", pin_file)
    if not pool:
        tokens = '[[token]]\nname = "kmip"\nbackend = "kmip"\nselect = { label = "kmip" }\n'
        soft = ""
    else:
        soft = f"""
[[backend]]
name = "soft"
module = "{softhsm['module']}"
call_timeout = 2.0
restart_delay = 0.2
env = {{ SOFTHSM2_CONF = "{softhsm['conf']}" }}
"""
        tokens = f"""
[[pool]]
name = "ha"
members = [{{ backend = "soft", select = {{ label = "{softhsm['label']}" }} }},
           {{ backend = "kmip", select = {{ label = "kmip" }} }}]
probe_interval = 0.25

[[token]]
name = "ha-token"
backend = "ha"
"""
    cfg = base / ("pool.toml" if pool else "import.toml")
    cfg.write_text(f"""
[server]
listen = "unix:path={base / ('pool.sock' if pool else 'import.sock')}"
state_dir = "{base / ('state-pool' if pool else 'state-import')}"
log_format = "json"

[state]
path = "{store}"
{soft}
{kmip}
{tokens}""")
    return cfg


def test_pool_of_softhsm_and_kmip_signs_through_either(kmip_server: KmipServerProc,
                                                       tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys")
    softhsm = make_member(tmp_path, 0, keys)
    pin_file = tmp_path / "kmip.pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    store = tmp_path / "shared-state.sqlite3"
    # the same RSA key into the KMIP server (Register), through the gateway
    imp = Gateway(_config(tmp_path, kmip_server, softhsm, pin_file, store, pool=False))
    try:
        for kind, typ in (("priv", "privkey"), ("pub", "pubkey")):
            r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "--login", "--pin",
                                PIN, "--write-object", str(keys[f"rsa-{kind}"]), "--type",
                                typ, "--id", "02", "--label", "rsa1"],
                               env=imp.client_env(), capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr + imp.log()[-2000:]
    finally:
        imp.stop()
    pub = load_der_public_key(keys["rsa-pub"].read_bytes())
    assert isinstance(pub, rsa.RSAPublicKey)

    def verified(sig: int | bytes) -> bool:
        assert isinstance(sig, bytes), f"sign failed: {sig:#x}"
        pub.verify(sig, MSG, padding.PKCS1v15(), hashes.SHA256())
        return True

    gw = Gateway(_config(tmp_path, kmip_server, softhsm, pin_file, store, pool=True))
    try:
        assert all(verified(_sign(gw, PIN)) for _ in range(4))
        # SoftHSM frozen: the pool takes it out of rotation, the KMIP server signs
        workers = worker_pids(gw)
        assert len(workers) == 1
        before = kmip_server.operations("Sign")
        os.kill(workers[0], signal.SIGSTOP)
        try:
            results = [_sign(gw, PIN) for _ in range(4)]
            assert verified(results[-1]) and verified(results[-2])
            # (the server's own log counts the signatures it made)
            assert kmip_server.operations("Sign") >= before + 2
        finally:  # (supervision may have killed the hung worker already)
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[0], signal.SIGCONT)
        # the KMIP server down: SoftHSM signs (once it is back in rotation)
        kmip_server.stop()
        try:
            results = [_sign(gw, PIN) for _ in range(8)]
            # the KMIP server is down: these are SoftHSM's, with the same key
            assert verified(results[-1]) and verified(results[-2])
        finally:
            kmip_server.start()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]
    records = gw.records()
    assert any(r.get("msg") == "KMIP server unreachable" for r in records)

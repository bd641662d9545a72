"""Helpers for the fail-closed tests: a gateway whose state or audit log sits on a small
tmpfs that a test can fill, a namespaced tenant speaking raw frames, and a look at the
SoftHSM token that bypasses the gateway."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.gateway_proc import RawClient
from tests.policy.tenants import CKF_RW, CKF_SERIAL, CKU_USER, C_Login, C_OpenSession, raw, slot_of

from p11gate.codec import Attribute, Mechanism, ReplyError

TENANT = 1001
C_GenerateKeyPair, C_SetAttributeValue = 59, 25
CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_ID = 1, 2, 3, 0x102
CKA_SIGN, CKA_VERIFY, CKA_EC_PARAMS = 0x108, 0x10A, 0x180
CKM_EC_KEY_PAIR_GEN, CKM_ECDSA = 0x1040, 0x1041
P256 = bytes.fromhex("06082a8648ce3d030107")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "512k") -> Iterator[Path]:
    """A small tmpfs mounted on ``path`` (unmounted afterwards, even on failure)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        for n in (1024, 256, 16, 1):  # the last partial page too
            while True:
                try:
                    f.write(b"\0" * n)
                except OSError:
                    break
    return filler


def free_pages(filler: Path, pages: int) -> None:
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - pages * 4096))


def gateway_config(base: Path, token: dict[str, Any], sockdir: Path, state: Path,
                   audit: Path, required: bool = True) -> Path:
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{state}"
socket_mode = 0o666
log_format = "json"

[audit]
file = "{audit}"
required = {'true' if required else 'false'}

[[backend]]
name = "softhsm"
module = "{token['module']}"
call_timeout = 20.0
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "{token['label']}" }}

[[rule]]
name = "tenant"
uid = [{TENANT}]
tokens = ["shared"]
namespace = {{ owned = true }}

[[rule]]
name = "admins"
uid = [0]
tokens = ["*"]
role = "officer"
""")
    return cfg


def tenant_session(path: str, pin: str) -> tuple[RawClient, int]:
    c = raw(path)
    slot = slot_of(c, "shared")
    (s,) = c.call(C_OpenSession, [slot, CKF_SERIAL | CKF_RW])
    c.call(C_Login, [s, CKU_USER, pin.encode()])
    return c, s


def ec_templates(label: bytes, cka_id: bytes) -> tuple[list[Attribute], list[Attribute]]:
    common = [Attribute(CKA_TOKEN, 1, 1), Attribute(CKA_LABEL, label, len(label)),
              Attribute(CKA_ID, cka_id, len(cka_id))]
    pub = [*common, Attribute(CKA_VERIFY, 1, 1), Attribute(CKA_EC_PARAMS, P256, len(P256))]
    priv = [*common, Attribute(CKA_PRIVATE, 1, 1), Attribute(CKA_SIGN, 1, 1)]
    return pub, priv


def generate(c: RawClient, s: int, label: bytes, cka_id: bytes) -> int:
    """C_GenerateKeyPair of an EC P-256 token key pair: its CK_RV."""
    pub, priv = ec_templates(label, cka_id)
    try:
        c.call(C_GenerateKeyPair, [s, Mechanism(CKM_EC_KEY_PAIR_GEN), pub, priv])
    except ReplyError as e:
        return e.rv
    return 0


def labels_on_token(token: dict[str, Any]) -> list[str]:
    """Every object label on the SoftHSM token, read by pkcs11-tool straight from the
    module (not through the gateway)."""
    out = subprocess.run(
        ["pkcs11-tool", "--module", token["module"], "--token-label", token["label"],
         "--login", "--pin", token["pin"], "--list-objects"],
        env=token["env"], capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split(":", 1)[1].strip().strip("'") for line in out.splitlines()
            if line.strip().startswith("label:")]

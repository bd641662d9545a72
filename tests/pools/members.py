"""Pool test set-up: several SoftHSM tokens holding the same key material, and a gateway
that serves them as one pool token."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tests.softhsm import make_token

PIN = "1234"


def key_material(d: Path) -> dict[str, Path]:
    """An EC P-256 and an RSA-2048 key pair as DER files (made once, imported everywhere)."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, key in (("ec", ec.generate_private_key(ec.SECP256R1())),
                      ("rsa", rsa.generate_private_key(65537, 2048))):
        priv = d / f"{name}-priv.der"
        priv.write_bytes(key.private_bytes(serialization.Encoding.DER,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        pub = d / f"{name}-pub.der"
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        out[f"{name}-priv"], out[f"{name}-pub"] = priv, pub
    return out


def import_keys(token: dict[str, Any], keys: dict[str, Path]) -> None:
    for name, kid in (("ec", "01"), ("rsa", "02")):
        for kind, typ in (("priv", "privkey"), ("pub", "pubkey")):
            r = subprocess.run(
                ["pkcs11-tool", "--module", token["module"], "--token-label", token["label"],
                 "--login", "--pin", token["pin"], "--write-object", str(keys[f"{name}-{kind}"]),
                 "--type", typ, "--id", kid, "--label", f"{name}1"],
                env=token["env"], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"importing {name}-{kind}: {r.stdout}\n{r.stderr}")


def make_member(base: Path, i: int, keys: dict[str, Path] | None) -> dict[str, Any]:
    token = make_token(base / f"member{i}", label=f"member{i}", pin=PIN, keys=False)
    if keys is not None:
        import_keys(token, keys)
    return token


def pool_config(base: Path, members: list[dict[str, Any]], *, max_sessions: int = 8,
                call_timeout: float = 2.0, isolation: str = "process",
                labels: list[str] | None = None, worker_command: list[str] | None = None,
                extra_pool: str = "", threads: int = 4) -> Path:
    sock = base / "p11gate.sock"
    text = f"""
[server]
listen = "unix:path={sock}"
state_dir = "{base / 'state'}"
log_format = "json"
"""
    for i, m in enumerate(members):
        wc = ""
        if worker_command is not None:
            wc = "worker_command = [" + ", ".join(f'"{a}"' for a in worker_command) + "]"
        text += f"""
[[backend]]
name = "m{i}"
module = "{m['module']}"
isolation = "{isolation}"
call_timeout = {call_timeout}
restart_delay = 0.2
threads = {threads}
env = {{ SOFTHSM2_CONF = "{m['conf']}" }}
{wc}
"""
    names = labels or [m["label"] for m in members]
    members_toml = ", ".join(
        f'{{ backend = "m{i}", select = {{ label = "{names[i]}" }} }}'
        for i in range(len(members)))
    text += f"""
[[pool]]
name = "ha"
members = [{members_toml}]
max_sessions_per_member = {max_sessions}
probe_interval = 0.25
{extra_pool}

[[token]]
name = "ha-token"
backend = "ha"
"""
    cfg = base / "p11gate.toml"
    cfg.write_text(text)
    return cfg

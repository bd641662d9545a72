"""SoftHSM tokens holding the same key material, for pool benchmarks and tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def _run(cmd: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}… failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def key_material(d: Path, rsa_key: bool = True) -> dict[str, Path]:
    """An EC P-256 (and an RSA-2048) key pair as DER files, to import into every member."""
    d.mkdir(parents=True, exist_ok=True)
    keys: list[tuple[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]] = [
        ("ec", ec.generate_private_key(ec.SECP256R1()))]
    if rsa_key:
        keys.append(("rsa", rsa.generate_private_key(65537, 2048)))
    out = {}
    for name, key in keys:
        priv, pub = d / f"{name}-priv.der", d / f"{name}-pub.der"
        priv.write_bytes(key.private_bytes(serialization.Encoding.DER,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        priv.chmod(0o600)
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        out[f"{name}-priv"], out[f"{name}-pub"] = priv, pub
    return out


def softhsm_token(base: Path, label: str, pin: str, so_pin: str = "5678") -> dict[str, str]:
    """A SoftHSM configuration of its own in ``base`` with one initialized token."""
    tokendir = base / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    _run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
          "--so-pin", so_pin], env)
    return {"module": SOFTHSM, "conf": str(conf), "label": label, "pin": pin}


def import_keys(token: dict[str, str], keys: dict[str, Path]) -> None:
    """Write the same key pairs into ``token``: EC as id 01 "ec1", RSA as id 02 "rsa1"."""
    env = {**os.environ, "SOFTHSM2_CONF": token["conf"]}
    for name, kid in (("ec", "01"), ("rsa", "02")):
        if f"{name}-priv" not in keys:
            continue
        for kind, typ in (("priv", "privkey"), ("pub", "pubkey")):
            _run(["pkcs11-tool", "--module", token["module"], "--token-label", token["label"],
                  "--login", "--pin", token["pin"], "--write-object",
                  str(keys[f"{name}-{kind}"]), "--type", typ, "--id", kid,
                  "--label", f"{name}1"], env)


def pool_config_text(sock: Path, state: Path, members: list[dict[str, str]],
                     member_lines: list[str], token: str, pool_lines: str = "") -> str:
    """A gateway configuration serving token ``token`` from a pool of ``members``
    (SoftHSM tokens as :func:`softhsm_token` makes them), each a back end with its own
    SoftHSM configuration and ``member_lines`` added to its table."""
    text = f"""\
[server]
listen = "unix:path={sock}"
state_dir = "{state}"
log_level = "warning"
"""
    for i, (m, extra) in enumerate(zip(members, member_lines, strict=True)):
        text += f"""
[[backend]]
name = "m{i}"
module = "{m['module']}"
env = {{ SOFTHSM2_CONF = "{m['conf']}" }}
{extra}
"""
    sel = ", ".join(f'{{ backend = "m{i}", select = {{ label = "{m["label"]}" }} }}'
                    for i, m in enumerate(members))
    return text + f"""
[[pool]]
name = "bench"
members = [{sel}]
{pool_lines}

[[token]]
name = "{token}"
backend = "bench"
"""


def soft_gateway_config(base: Path, label: str, pin: str, so_pin: str) -> Path:
    """A gateway serving a built-in soft token file with the benchmarks' key ids (EC P-256
    as CKA_ID 01 "ec1", RSA-2048 as 02 "rsa1", generated in it: it imports no private
    keys), made once in ``base``."""
    from ..backends.soft.provision import KeySpec, provision_sync

    base.mkdir(parents=True, exist_ok=True)
    path = base / "soft.db"
    provision_sync(str(path), label, so_pin.encode(), pin.encode(),
                   [KeySpec("P-256", b"\x01", "ec1"), KeySpec("rsa:2048", b"\x02", "rsa1")])
    cfg = base / "soft.toml"
    cfg.write_text(f"""\
[server]
listen = "unix:path={base / 'soft.sock'}"
state_dir = "{base / 'state'}"
log_level = "warning"

[[backend]]
name = "soft"
type = "soft"
path = "{path}"

[[token]]
name = "{label}"
backend = "soft"
select = {{ label = "{label}" }}
""")
    return cfg

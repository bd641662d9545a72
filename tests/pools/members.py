"""Pool test set-up: several SoftHSM tokens holding the same key material, and a gateway
that serves them as one pool token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.softhsm import make_token

from p11gate.bench.tokens import import_keys, key_material

__all__ = ["PIN", "import_keys", "key_material", "make_member", "pool_config"]

PIN = "1234"


def make_member(base: Path, i: int, keys: dict[str, Path] | None) -> dict[str, Any]:
    token = make_token(base / f"member{i}", label=f"member{i}", pin=PIN, keys=False)
    if keys is not None:
        import_keys(token, keys)
    return token


def pool_config(base: Path, members: list[dict[str, Any]], *, max_sessions: int = 8,
                call_timeout: float = 2.0, isolation: str = "process",
                labels: list[str] | None = None, worker_command: list[str] | None = None,
                extra_pool: str = "", threads: int = 4,
                confs: list[str] | None = None) -> Path:
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
env = {{ SOFTHSM2_CONF = "{(confs or [])[i] if confs else m['conf']}" }}
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

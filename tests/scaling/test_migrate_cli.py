"""`p11gate migrate` on both engines, and the one-line refusal of `p11gate serve` when
the PostgreSQL store cannot be reached (the password never in what it prints)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.postgres import Postgres
from tests.softhsm import make_token

from p11gate.state.migrate import latest_version


def _config(base: Path, state: str) -> Path:
    tok = make_token(base / "hsm", label="t", keys=False)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={base / 'gw.sock'}"
state_dir = "{base / 'state'}"

{state}

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[token]]
name = "t"
backend = "softhsm"
select = {{ label = "t" }}
""")
    return cfg


def _p11gate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_migrate_applies_then_finds_nothing_to_do(tmp_path: Path) -> None:
    with Postgres() as pg:
        for engine, state in (
            ("sqlite", ""),
            ("postgresql", f'[state]\nengine = "postgresql"\ndsn = "{pg.dsn}"\n'
                           f'password_file = "{pg.password_file}"'),
        ):
            cfg = _config(tmp_path / engine, state)
            latest = latest_version(engine)
            behind = _p11gate("migrate", "--config", str(cfg), "--status")
            assert behind.returncode == 1 and "schema version 0" in behind.stdout, behind
            first = _p11gate("migrate", "--config", str(cfg))
            assert first.returncode == 0, first.stderr
            assert f"schema version {latest} (applied 1, 2" in first.stdout
            again = _p11gate("migrate", "--config", str(cfg))
            assert f"schema version {latest} (up to date)" in again.stdout
            assert _p11gate("migrate", "--config", str(cfg), "--status").returncode == 0
            assert pg.password not in first.stdout + first.stderr


def test_serve_refuses_an_unreachable_store_in_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "pg.password"
    secret.write_text("not-to-be-printed-9\n")
    cfg = _config(tmp_path, f'[state]\nengine = "postgresql"\n'
                            f'dsn = "host={tmp_path / "nowhere"} port=5999 dbname=p11gate '
                            f'user=p11gate"\npassword_file = "{secret}"\nconnect_timeout = 1.0')
    r = _p11gate("serve", "--config", str(cfg))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "state store" in ln]
    assert len(lines) == 1 and "no answer within 1 s" in lines[0], r.stderr
    assert "port=5999" in lines[0] and "pg_hba.conf" in lines[0]
    assert "not-to-be-printed-9" not in r.stdout + r.stderr

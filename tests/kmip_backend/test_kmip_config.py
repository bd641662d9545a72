"""`[backend.kmip]` validation and what `check-config` shows of it (never the password)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.kmip_backend.kmip_server import KmipServerProc

from p11gate.config import ConfigError, load_config

SECRET = "kmip-password-never-shown"


@pytest.fixture()
def files(tmp_path: Path) -> KmipServerProc:
    return KmipServerProc(tmp_path)  # certificates only; the server is not started


def _write(tmp_path: Path, server: KmipServerProc, **kmip: object) -> Path:
    pin = tmp_path / "kmip.pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    cfg = tmp_path / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={tmp_path / 's.sock'}"
state_dir = "{tmp_path / 'state'}"

{server.backend_toml("kmip", pin, **kmip)}
[[token]]
name = "kmip"
backend = "kmip"
""")
    return cfg


def test_defaults_and_check_config(tmp_path: Path, files: KmipServerProc) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = _write(tmp_path, files, username="gw", password_file=str(tmp_path / "pw"))
    c = load_config(cfg).backend[0]
    assert c.kmip is not None
    k = c.kmip
    assert (k.port, k.timeout, k.pool_size, k.retries, k.kmip_version) == (
        files.port, 5.0, 4, 2, "1.2")
    assert k.idmap_path == str(tmp_path / "state" / "kmip-kmip.sqlite")
    assert k.password() == SECRET
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"KMIP 1.2 server 127.0.0.1:{files.port}" in r.stdout
    assert "credential user 'gw'" in r.stdout
    assert SECRET not in r.stdout + r.stderr
    # a password others can read is an error
    (tmp_path / "pw").chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "kmip.password_file" in r.stderr and "chmod 600" in r.stderr
    assert SECRET not in r.stdout + r.stderr


@pytest.mark.parametrize(("extra", "message"), [
    ({"username": "gw"}, "username and a password"),
    ({"password_env": "X", "password_file": "/etc/hostname", "username": "u"}, "not both"),
    ({"pool_size": 0}, "pool_size"),
    ({"timeout": 0}, "timeout"),
    ({"kmip_version": "3.0"}, "kmip_version"),
    ({"idmap_path": "relative.sqlite"}, "absolute path"),
    ({"bogus": 1}, "bogus"),
    ({"username": "u", "password_env": "HOME"}, "passed on to every worker"),
])
def test_bad_sections_are_refused(tmp_path: Path, files: KmipServerProc,
                                  extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, files, **extra))


def test_kmip_type_needs_its_section(tmp_path: Path) -> None:
    cfg = tmp_path / "p11gate.toml"
    cfg.write_text('[[backend]]\nname = "k"\ntype = "kmip"\n[[token]]\nname = "t"\n'
                   'backend = "k"\n')
    with pytest.raises(ConfigError, match=r"\[backend.kmip\]"):
        load_config(cfg)


def test_password_env_not_given_to_a_worker(tmp_path: Path, files: KmipServerProc) -> None:
    cfg = _write(tmp_path, files, username="gw", password_env="KMIP_PASSWORD")
    cfg.write_text(cfg.read_text() + """
[[backend]]
name = "other"
module = "/bin/true"
env = { KMIP_PASSWORD = "x" }
""")
    with pytest.raises(ConfigError, match="worker would see the password"):
        load_config(cfg)

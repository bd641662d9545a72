"""SoftHSMv2 tokens for tests (shared by unit and integration tests).

``make_token(tmpdir)`` creates a private SoftHSM configuration and token directory under
``tmpdir``, initializes one token and (by default) generates two key pairs in it with
``pkcs11-tool``:

* EC P-256, CKA_ID ``01``, CKA_LABEL ``"ec1"``
* RSA-2048, CKA_ID ``02``, CKA_LABEL ``"rsa1"``

It returns a dict::

    {
        "module": "/usr/lib/softhsm/libsofthsm2.so",  # MODULE
        "conf": "<tmpdir>/softhsm2.conf",             # the SOFTHSM2_CONF file
        "tokendir": "<tmpdir>/tokens",
        "env": {...os.environ, "SOFTHSM2_CONF": conf}, # for subprocesses
        "label": label, "pin": pin, "so_pin": so_pin,
        "serial": "<token serial number>",
    }

To use the token in-process, set ``os.environ["SOFTHSM2_CONF"] = token["conf"]`` (e.g.
with ``monkeypatch.setenv``) *before* the module's C_Initialize: SoftHSM reads the
variable there. Calling ``make_token`` again with the same ``tmpdir`` adds another token
to the same configuration (use a different label).

Import it as ``from tests.softhsm import make_token, requires_softhsm`` (pytest runs
with the repository root on ``sys.path``). The signature of ``make_token`` is stable;
other test suites rely on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_available() -> bool:
    """True when SoftHSMv2 and pkcs11-tool are installed."""
    return (
        os.path.exists(MODULE)
        and shutil.which("softhsm2-util") is not None
        and shutil.which("pkcs11-tool") is not None
    )


#: ``@requires_softhsm`` skips a test (or module, via ``pytestmark``) without SoftHSM
requires_softhsm = pytest.mark.skipif(not softhsm_available(), reason="SoftHSMv2 not installed")


def _run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def make_token(
    tmpdir: str | os.PathLike[str],
    label: str = "anchor",
    pin: str = "1234",
    so_pin: str = "5678",
    keys: bool = True,
) -> dict[str, Any]:
    """Create (or add to) a SoftHSM configuration in ``tmpdir`` with one initialized
    token, and unless ``keys`` is false an EC P-256 (id 01, "ec1") and an RSA-2048
    (id 02, "rsa1") key pair in it. See the module docstring for the returned dict."""
    base = Path(tmpdir)
    tokendir = base / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokendir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = str(conf)

    _run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ],
        env,
    )
    serial = candidate = ""
    for line in _run(["softhsm2-util", "--show-slots"], env).splitlines():
        line = line.strip()
        if line.startswith("Serial number:"):
            candidate = line.split(":", 1)[1].strip()
        elif line.startswith("Label:") and line.split(":", 1)[1].strip() == label:
            serial = candidate
    if keys:
        common = [
            "pkcs11-tool",
            "--module",
            MODULE,
            "--token-label",
            label,
            "--login",
            "--pin",
            pin,
            "--keypairgen",
        ]
        _run([*common, "--key-type", "EC:prime256v1", "--id", "01", "--label", "ec1"], env)
        _run([*common, "--key-type", "rsa:2048", "--id", "02", "--label", "rsa1"], env)
    return {
        "module": MODULE,
        "conf": str(conf),
        "tokendir": str(tokendir),
        "env": env,
        "label": label,
        "pin": pin,
        "so_pin": so_pin,
        "serial": serial,
    }

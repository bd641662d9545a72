"""Demo mode: with no configuration, serve a SoftHSMv2 token created in the state dir."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
DEMO_LABEL = "demo"
DEMO_PIN = "1234"
DEMO_SO_PIN = "12345678"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/p11gate")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "p11gate"


def find_softhsm() -> str:
    for p in SOFTHSM_CANDIDATES:
        if os.path.exists(p):
            return p
    raise SystemExit(
        "demo mode needs SoftHSMv2: install it (Debian/Ubuntu: apt-get install softhsm2) "
        "or pass --config FILE"
    )


def demo_config(state_dir: Path) -> dict[str, Any]:
    """Create (once) a SoftHSM token with an EC and an RSA key; return a config dict."""
    module = find_softhsm()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = state_dir / "softhsm-tokens"
    conf = state_dir / "softhsm2.conf"
    if not conf.exists():
        tokens.mkdir(exist_ok=True, mode=0o700)
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    if not any(tokens.iterdir()):
        util = shutil.which("softhsm2-util")
        if util is None:
            raise SystemExit("demo mode needs softhsm2-util (apt-get install softhsm2)")
        subprocess.run(
            [util, "--init-token", "--free", "--label", DEMO_LABEL, "--pin", DEMO_PIN,
             "--so-pin", DEMO_SO_PIN],
            env=env, check=True, capture_output=True,
        )
        tool = shutil.which("pkcs11-tool")
        if tool is not None:
            for key_type, kid, label in (("EC:prime256v1", "01", "demo-ec"),
                                         ("rsa:2048", "02", "demo-rsa")):
                subprocess.run(
                    [tool, "--module", module, "--token-label", DEMO_LABEL, "--login",
                     "--pin", DEMO_PIN, "--keypairgen", "--key-type", key_type, "--id", kid,
                     "--label", label],
                    env=env, check=True, capture_output=True,
                )
    return {
        "server": {"listen": f"unix:path={state_dir / 'p11gate.sock'}",
                   "state_dir": str(state_dir), "log_format": "text"},
        "backend": [{"name": "softhsm", "module": module, "env": {"SOFTHSM2_CONF": str(conf)}}],
        "token": [{"name": DEMO_LABEL, "backend": "softhsm", "select": {"label": DEMO_LABEL}}],
    }

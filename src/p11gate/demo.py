"""Demo mode: with no configuration, serve a built-in soft token made in the state dir.

The token (label ``demo``, user PIN 1234, SO PIN 12345678, an EC P-256 key id 01 and an
RSA-2048 key id 02) is one SQLite file, ``demo-token.db``, made once and then reused. Its
at-rest protection is the soft token's own: key values sealed under a token key that is
stored only wrapped under scrypt keys of the two PINs. The demo PINs are public, so the
real protection of the demo keys is the file's mode (0600, in a 0700 state directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEMO_LABEL = "demo"
DEMO_PIN = "1234"
DEMO_SO_PIN = "12345678"
DEMO_TOKEN_FILE = "demo-token.db"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/p11gate")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "p11gate"


def demo_config(state_dir: Path) -> dict[str, Any]:
    """Create (once) the demo soft token with an EC and an RSA key; return a config dict."""
    from .backends.soft.provision import KeySpec, provision_sync

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / DEMO_TOKEN_FILE
    provision_sync(str(path), DEMO_LABEL, DEMO_SO_PIN.encode(), DEMO_PIN.encode(),
                   [KeySpec("P-256", b"\x01", "demo-ec"),
                    KeySpec("rsa:2048", b"\x02", "demo-rsa")])
    return {
        "server": {"listen": f"unix:path={state_dir / 'p11gate.sock'}",
                   "state_dir": str(state_dir), "log_format": "text"},
        "backend": [{"name": "demo", "type": "soft", "path": str(path),
                     "label": DEMO_LABEL}],
        "token": [{"name": DEMO_LABEL, "backend": "demo", "select": {"label": DEMO_LABEL}}],
    }

"""Fourth review (TLS key files): a private key other users can read lets them be that
TLS identity (the gateway's, a tenant's behind a tunnel or agent). Nothing said so:
`check-config`/`serve` warned about PIN and KMIP key files but not `[tls] key` or
`[metrics] tls_key`, and the tunnel and agent took any key. Now each says it, naming
the file, its mode and the fix (a warning: the tunnel runs as each application's user)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.remote.tls_setup import free_port, open_config, tls_setup

P11GATE = [sys.executable, "-m", "p11gate.cli"]


def test_keys_others_can_read_are_named(tmp_path: Path) -> None:
    s = tls_setup(tmp_path)
    cfg = open_config(tmp_path / "gw", s.token, s.pki, s.port)
    for name in ("server.key", "tenant-a.key"):
        s.pki[name].chmod(0o644)
    r = subprocess.run([*P11GATE, "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert f"tls.key: '{s.pki['server.key']}' is readable or writable by group/others " \
           "(mode 0644)" in out, out
    assert f"chmod 600 {s.pki['server.key']}" in out
    # the tunnel says it too (then fails to reach the dead gateway, as it should)
    key = s.pki["tenant-a.key"]
    r = subprocess.run([*P11GATE, "tunnel", "--cert", str(s.pki["tenant-a.pem"]), "--key",
                        str(key), "--ca", str(s.pki["ca"]), "--timeout", "2",
                        f"tls:127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert f"--key: '{key}' is readable or writable by group/others (mode 0644)" in r.stderr
    # a 0600 key: nothing said
    key.chmod(0o600)
    s.pki["server.key"].chmod(0o600)
    r = subprocess.run([*P11GATE, "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert "group/others" not in r.stdout + r.stderr

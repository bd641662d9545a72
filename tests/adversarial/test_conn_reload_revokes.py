"""A revocation applied by a reload (SIGHUP, `p11gate reload`) closes the revoked
client's established TLS connection.

The CRL watcher closes such connections when it loads a changed file
(test_review4_dec07_crl.py); here the watcher checks once an hour, so only the reload can
have done it: two TLS clients connected and signing in a loop, the CRL file rewritten
to revoke one's certificate, then SIGHUP or `p11gate reload` → that connection is closed
(its loop ends), a new handshake with that certificate is refused, and the other
client's loop goes on without an error. Also with `[server] processes = 2` (the
supervisor passes the SIGHUP on, `reload` reaches every process). Real `p11gate serve`,
real SoftHSM, raw TLS frames.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import RawClient, sign, wait_for
from tests.remote.crl_gateway import CrlGateway
from tests.remote.tls_setup import tls_signer
from tests.softhsm import make_token


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"token": make_token(tmp_path_factory.mktemp("crl-reload") / "softhsm")}


@pytest.fixture(params=[1, 2], ids=["1-process", "2-processes"])
def g(request: pytest.FixtureRequest, token: dict[str, Any],
      tmp_path: Path) -> Iterator[CrlGateway]:
    gw = CrlGateway(token, tmp_path, first_crl_days=7, check_interval=3600,
                    processes=request.param)
    gw.processes = request.param  # type: ignore[attr-defined]
    yield gw
    alive = gw.gw.alive()
    gw.gw.stop()
    assert alive, gw.gw.log()[-3000:]


def _reloads(g: CrlGateway) -> int:
    return sum(1 for r in g.gw.records() if r.get("msg") == "configuration reloaded")


class Loop(threading.Thread):
    """Signs on one connection until it fails or is told to stop."""

    def __init__(self, client: tuple[RawClient, int, int]) -> None:
        super().__init__(daemon=True)
        self.client, self.ok, self.error = client, 0, None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                sign(*self.client)
            except Exception as e:
                self.error = e
                return
            self.ok += 1


@pytest.mark.parametrize("how", ["sighup", "p11gate reload"])
def test_a_reload_closes_the_connection_its_crl_revokes(g: CrlGateway, how: str) -> None:
    keep = Loop(tls_signer(g.files, g.port, "keep"))
    revoke = Loop(tls_signer(g.files, g.port, "revoke"))
    keep.start()
    revoke.start()
    g.publish(["revoke"], days=7)
    time.sleep(1.0)
    # the watcher has not looked (once an hour): the client still signs
    assert revoke.error is None and revoke.is_alive()
    signed = revoke.ok
    assert wait_for(lambda: revoke.ok > signed)
    before = _reloads(g)
    if how == "sighup":
        os.kill(g.gw.proc.pid, signal.SIGHUP)
    else:
        r = subprocess.run([sys.executable, "-m", "p11gate.cli", "reload", "--config",
                            str(g.config)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    every = g.processes  # type: ignore[attr-defined]
    assert wait_for(lambda: _reloads(g) == before + every, timeout=30), g.gw.log()[-2000:]
    # the revoked client's connection is closed by the gateway: its loop ends
    revoke.join(timeout=15)
    assert not revoke.is_alive(), g.gw.log()[-2000:]
    assert isinstance(revoke.error, (ConnectionError, OSError)), revoke.error
    assert any(r.get("reason") == "client certificate revoked by the CRL"
               for r in g.gw.records())
    # a new handshake with its certificate is refused (by every process)
    assert all(g.refused("revoke") for _ in range(4))
    # the other client's loop went on without an error, and it can connect again
    signed = keep.ok
    assert wait_for(lambda: keep.ok > signed + 5)
    keep.halt.set()
    keep.join(timeout=15)
    assert keep.error is None, keep.error
    assert not g.refused("keep")
    again = tls_signer(g.files, g.port, "keep")
    sign(*again)
    for c in (keep.client[0], revoke.client[0], again[0]):
        c.close()

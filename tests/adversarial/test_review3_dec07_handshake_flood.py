"""Review 3, Dec 7: TLS handshakes under way were not counted against max_connections.

The TLS listener asks the limits whether there is room before it runs a handshake, but
the limits counted only connections whose handshake had succeeded: a peer without any
certificate could open any number of TCP connections and send nothing, each holding a
descriptor and a handshake task for HANDSHAKE_TIMEOUT (10 s), past max_connections
(and down to fd_reserve, which then refuses every client, local ones too)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tests.adversarial.limits_helpers import nofile
from tests.gateway_proc import Gateway
from tests.remote.tls_setup import open_config, tls_setup


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def test_silent_tcp_peers_cannot_exceed_max_connections(tmp_path: Path) -> None:
    s = tls_setup(tmp_path)
    cfg = open_config(tmp_path / "gw", s.token, s.pki, s.port)
    text = cfg.read_text().replace("[server]\n", "[server]\nmax_connections = 8\n", 1)
    cfg.write_text(text)
    gw = Gateway(cfg)
    held: list[socket.socket] = []
    try:
        base = _sockets(gw.proc.pid)
        for _ in range(60):
            c = socket.create_connection(("127.0.0.1", s.port))
            held.append(c)  # never sends a ClientHello
        time.sleep(1.0)
        during = _sockets(gw.proc.pid) - base
        assert during <= 8 + 2, f"{during} sockets held by 60 silent TCP peers"
        assert gw.alive()
    finally:
        for c in held:
            c.close()
        gw.stop()


def test_silent_tcp_peers_leave_the_fd_reserve(tmp_path: Path) -> None:
    """Under RLIMIT_NOFILE 1024, 1,100 TCP peers with no certificate that never send a
    ClientHello took every descriptor of the gateway (fds_short's shortcut counted only
    admitted connections), so a local client was reset; now the TLS listener refuses
    them once fd_reserve (64) is reached."""
    s = tls_setup(tmp_path)
    cfg = open_config(tmp_path / "gw", s.token, s.pki, s.port)
    with nofile(1024, 1024):
        gw = Gateway(cfg)
    held: list[socket.socket] = []
    try:
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", s.port), timeout=2))
        time.sleep(1.0)
        fds = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
        assert fds <= 1024 - 32, f"the gateway holds {fds} of 1024 descriptors"
        assert gw.alive()
    finally:
        for c in held:
            c.close()
        gw.stop()

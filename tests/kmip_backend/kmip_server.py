"""A real PyKMIP server for the tests: its own CA, server and client certificates, on a
free localhost port, TLS 1.2 with client-certificate authentication, its keys in a
SQLite file in the test's directory (so a stop and a start keep them)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from tests.adversarial.tls_pki import Authority

_SERVE = """
import sys
from kmip.services.server import KmipServer
d, port = sys.argv[1], int(sys.argv[2])
server = KmipServer(hostname="127.0.0.1", port=port, certificate_path=d + "/server.pem",
                    key_path=d + "/server.key", ca_path=d + "/ca.pem", auth_suite="TLS1.2",
                    config_path=None, log_path=d + "/server.log", policy_path=d + "/policies",
                    enable_tls_client_auth=True, logging_level="INFO",
                    database_path=d + "/kmip.db")
with server:
    server.serve()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem(obj: object) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined, no-any-return]


def _key(key: object, path: Path) -> None:
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)


class KmipServerProc:
    def __init__(self, d: Path) -> None:
        self.dir = d
        (d / "policies").mkdir(exist_ok=True)
        ca = Authority("kmip-test-ca")
        (d / "ca.pem").write_bytes(_pem(ca.cert))
        for who, server in (("server", True), ("client", False)):
            cert, key = ca.issue(f"p11gate-{who}", server=server)
            (d / f"{who}.pem").write_bytes(_pem(cert))
            _key(key, d / f"{who}.key")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(self.dir),
                                      str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "stderr.log", "ab"),
                                     # its own group: PyKMIP starts a multiprocessing
                                     # manager that must go with it
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("PyKMIP server did not listen\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its manager
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        out = ""
        for f in ("stderr.log", "server.log"):
            p = self.dir / f
            if p.exists():
                out += p.read_text(errors="replace")[-3000:]
        return out

    def operations(self, name: str) -> int:
        """How many KMIP operations ``name`` (e.g. "Sign") the server has processed."""
        p = self.dir / "server.log"
        text = p.read_text(errors="replace") if p.exists() else ""
        return text.count(f"Processing operation: {name}\n")

    def client(self) -> Any:
        """A PyKMIP client of our own (keys "made outside the gateway")."""
        import ssl

        from kmip.core import enums
        from kmip.pie.client import ProxyKmipClient

        d = self.dir
        c = ProxyKmipClient(hostname="127.0.0.1", port=self.port, cert=str(d / "client.pem"),
                            key=str(d / "client.key"), ca=str(d / "ca.pem"),
                            ssl_version="PROTOCOL_SSLv23", config_file=None,
                            kmip_version=enums.KMIPVersion.KMIP_1_2)
        c.proxy.cert_reqs = ssl.CERT_REQUIRED
        c.open()
        return c

    def backend_toml(self, name: str, pin_file: Path, **extra: object) -> str:
        d = self.dir
        lines = [f'[[backend]]\nname = "{name}"\ntype = "kmip"\nlabel = "{name}"\n',
                 f'[backend.kmip]\nhost = "127.0.0.1"\nport = {self.port}\n'
                 f'cert = "{d}/client.pem"\nkey = "{d}/client.key"\nca = "{d}/ca.pem"\n'
                 f'pin_file = "{pin_file}"\n']
        lines += [f"{k} = {v!r}\n" for k, v in extra.items()]
        return "".join(lines)

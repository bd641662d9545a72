"""The admin socket: `p11gate status` asks the running daemon how it is doing.

A unix socket (mode 0600, in the state directory by default) that answers one request
per connection with one JSON document. It carries counts, states and names — never
PINs, credentials or key material (the status is built from ``describe()`` methods
that only report those).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .unix_socket import BoundSocket, bind_unix

#: requests the admin socket understands
COMMANDS = ("status",)


def admin_socket_path(state_dir: str, configured: str | None) -> str:
    return configured or str(Path(state_dir) / "admin.sock")


class AdminServer:
    def __init__(self, path: str, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._status = status
        self._server: asyncio.AbstractServer | None = None
        self._bound: BoundSocket | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # created 0600 from the start; a live gateway's admin socket is never taken over
        self._bound = bind_unix(self.path, 0o600, what="admin socket")
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _AdminProtocol(self._status), sock=self._bound.sock
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._bound is not None:
            self._bound.unlink()  # only the file this process created


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        if b"\n" not in self._buf:
            if len(self._buf) > 256:
                self._transport.abort()
            return
        command = self._buf.split(b"\n", 1)[0].strip().decode(errors="replace")
        if command == "status":
            reply: dict[str, Any] = self._status()
        else:
            reply = {"error": f"unknown command {command[:32]!r}; known: {', '.join(COMMANDS)}"}
        self._transport.write(json.dumps(reply, default=str).encode() + b"\n")
        self._transport.close()


def query(path: str, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running daemon (blocking; for the CLI and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    out: dict[str, Any] = json.loads(b"".join(chunks))
    return out

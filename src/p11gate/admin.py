"""The admin socket: `p11gate status` asks the running daemon how it is doing, and
`p11gate reload` has it re-read its configuration file.

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
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .unix_socket import BoundSocket, bind_unix

#: requests the admin socket understands ("metrics": the process's samples, for the
#: supervisor of [server] processes, see metrics_merge.py)
COMMANDS = ("status", "reload", "metrics")

#: the daemon's reload, given who asked (for the audit record); the reply says whether
#: the new file is in force, and why not
Reload = Callable[[str], Awaitable[dict[str, Any]]]


def admin_socket_path(state_dir: str, configured: str | None) -> str:
    return configured or str(Path(state_dir) / "admin.sock")


class AdminServer:
    def __init__(self, path: str, status: Callable[[], dict[str, Any]],
                 reload: Reload | None = None,
                 metrics: Callable[[], Any] | None = None) -> None:
        self.path = path
        self._status = status
        self._reload = reload
        self._metrics = metrics
        self._server: asyncio.AbstractServer | None = None
        self._bound: BoundSocket | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # created 0600 from the start; a live gateway's admin socket is never taken over
        self._bound = bind_unix(self.path, 0o600, what="admin socket")
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _AdminProtocol(self._status, self._reload, self._metrics),
            sock=self._bound.sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._bound is not None:
            self._bound.unlink()  # only the file this process created


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, status: Callable[[], dict[str, Any]], reload: Reload | None,
                 metrics: Callable[[], Any] | None) -> None:
        self._status = status
        self._reload = reload
        self._metrics = metrics
        self._busy = False
        self._task: asyncio.Task[dict[str, Any]] | None = None
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
        if self._busy:
            return  # one request per connection: later bytes are ignored
        self._busy = True
        command = self._buf.split(b"\n", 1)[0].strip().decode(errors="replace")
        if command == "reload" and self._reload is not None:
            # answered when the reload has finished (or was refused)
            self._task = asyncio.ensure_future(self._reload(self._requester()))
            self._task.add_done_callback(self._reloaded)
            return
        if command == "status":
            reply: dict[str, Any] = self._status()
        elif command == "metrics" and self._metrics is not None:
            reply = {"families": self._metrics()}
        else:
            reply = {"error": f"unknown command {command[:32]!r}; known: {', '.join(COMMANDS)}"}
        self._answer(reply)

    def _requester(self) -> str:
        """Who asked, for the audit record: the admin socket's peer uid and pid."""
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except (OSError, AttributeError, struct.error):
            return "admin socket"
        return f"admin socket uid={uid} pid={pid}"

    def _reloaded(self, task: asyncio.Task[dict[str, Any]]) -> None:
        if task.cancelled():
            self._answer({"ok": False, "error": "reload cancelled (gateway stopping)"})
        elif task.exception() is not None:
            self._answer({"ok": False, "error": f"reload failed: {task.exception()!r}"})
        else:
            self._answer(task.result())

    def _answer(self, reply: dict[str, Any]) -> None:
        assert self._transport is not None
        if self._transport.is_closing():
            return
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

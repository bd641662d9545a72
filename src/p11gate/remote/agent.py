"""`p11gate agent`: a local unix socket for many applications, relayed over TLS to one of
several gateways.

Each local connection gets its own TLS connection, to the first gateway that answers;
the agent remembers which one answered last and tries it first, so when a gateway stops,
new connections go to the next one (connections that were on the stopped gateway end,
as they would with a direct connection). The gateway sees the agent's certificate: all
applications behind one agent share its identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import urllib.parse

from .relay import NoGateway, open_tls, splice
from .tls import client_context

log = logging.getLogger("p11gate.agent")


class Agent:
    def __init__(self, listen: str, addresses: list[str], cert: str, key: str, ca: str,
                 timeout: float = 3.0, socket_mode: int = 0o600) -> None:
        if not listen.startswith("unix:path=/"):
            raise ValueError(f"{listen!r}: the agent listens on unix:path=/absolute/path")
        self.path = urllib.parse.unquote(listen.removeprefix("unix:path="))
        self.addresses = addresses
        self.ctx = client_context(cert, key, ca)
        self.timeout = timeout
        self.socket_mode = socket_mode
        self._preferred = 0
        self._server: asyncio.AbstractServer | None = None
        self.relayed = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.socket_mode)

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            gr, gw, i = await open_tls(self.addresses, self.ctx, self.timeout, self._preferred)
        except NoGateway as e:
            log.error("no gateway for a local client", extra={"error": str(e)})
            w.close()
            return
        self._preferred = i
        self.relayed += 1
        log.info("relaying", extra={"gateway": self.addresses[i]})
        await splice((r, w), (gr, gw))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def run_agent(agent: Agent) -> int:
    await agent.start()
    print(f"P11_KIT_SERVER_ADDRESS=unix:path={agent.path}; export P11_KIT_SERVER_ADDRESS;",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
    print("p11gate agent stopped", file=sys.stderr)
    return 0

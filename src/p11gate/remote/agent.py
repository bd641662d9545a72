"""`p11gate agent`: a local unix socket for many applications, relayed over TLS to
several gateway nodes.

Each local connection gets its own TLS connection, to the healthy node with the fewest
of the agent's connections (`nodes.NodeSet`: health checks, back-off). By default the
agent follows the RPC protocol of each connection (`agent_session`), so when its node
dies the application keeps its connection, sessions, login, handles and operations on
another node (`resume`); with ``resume=False`` it only relays bytes, and a node's death
ends the connections on it. The gateway sees the agent's certificate: all applications
behind one agent share its identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
import urllib.parse

from ..unix_socket import BoundSocket, SocketInUse, bind_unix
from .agent_session import AppConnection
from .node_link import NodeLost
from .nodes import NodeSet, NoGateway
from .relay import splice
from .tls import client_context

log = logging.getLogger("p11gate.agent")


class Agent:
    def __init__(self, listen: str, addresses: list[str], cert: str, key: str, ca: str,
                 timeout: float = 3.0, socket_mode: int = 0o600, resume: bool = True,
                 check_interval: float = 2.0) -> None:
        if not listen.startswith("unix:path=/"):
            raise ValueError(f"{listen!r}: the agent listens on unix:path=/absolute/path")
        self.path = urllib.parse.unquote(listen.removeprefix("unix:path="))
        self.addresses = addresses
        self.ctx = client_context(cert, key, ca)
        self.timeout = timeout
        self.socket_mode = socket_mode
        self.nodes = NodeSet(addresses, self.ctx, timeout, check_interval)
        self.resume = resume
        self._server: asyncio.AbstractServer | None = None
        self._bound: BoundSocket | None = None
        self.relayed = 0

    async def start(self) -> None:
        """Listen on the socket. Refused (ValueError): a directory any user can write
        without the sticky bit (one could put their own socket in place of the agent's
        and collect the applications' PINs), a path that is not a socket, and the socket
        of a live process (an agent or gateway there was unlinked and its address
        taken). A new directory is made 0755 whatever the umask."""
        d = os.path.dirname(self.path) or "."
        if not os.path.isdir(d):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        mode = stat.S_IMODE(os.stat(d).st_mode)
        if mode & 0o002 and not mode & stat.S_ISVTX:
            raise ValueError(f"{d}: any local user can write this directory (mode "
                             f"{mode:04o}) and replace the agent's socket with their own; "
                             "use a directory only this user can write")
        try:
            self._bound = bind_unix(self.path, self.socket_mode, "agent socket")
        except (SocketInUse, OSError) as e:
            raise ValueError(str(e)) from None
        self._server = await asyncio.start_unix_server(self._client, sock=self._bound.sock)
        self.nodes.start_checks()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.relayed += 1
        try:
            if self.resume:
                await AppConnection(self.nodes, r, w).serve()
                return
            (gr, gw), node = await self.nodes.connect()
        except (NoGateway, NodeLost) as e:
            log.error("no gateway for a local client", extra={"error": str(e)})
            w.close()
            return
        log.info("relaying", extra={"gateway": node.address})
        try:
            await splice((r, w), (gr, gw))
        finally:
            self.nodes.release(node)

    async def stop(self) -> None:
        await self.nodes.stop_checks()
        if self._server is not None:
            self._server.close()
        if self._bound is not None:
            self._bound.unlink()  # only the socket this agent made, not a successor's


async def run_agent(agent: Agent) -> int:
    try:
        await agent.start()
    except ValueError as e:
        print(f"p11gate agent: {e}", file=sys.stderr)
        return 2
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

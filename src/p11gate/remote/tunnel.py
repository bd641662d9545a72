"""`p11gate tunnel`: one client's RPC stream between stdin/stdout and a gateway over TLS.

The stock p11-kit client runs it for each application that loads the client module:

    export P11_KIT_SERVER_ADDRESS="|p11gate tunnel --cert c.pem --key c.key --ca ca.pem tls:gw:8443"

or, for applications that load modules through p11-kit-proxy.so, a module file with
``remote: |p11gate tunnel …``. p11-kit starts the command with one end of a socketpair as
its stdin and stdout.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import sys

from .relay import NoGateway, open_tls, splice
from .tls import client_context


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        # p11-kit gives us a socketpair end as stdin and stdout: use it as one socket
        sock = socket.socket(fileno=os.dup(0))
        return await asyncio.open_connection(sock=sock)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), sys.stdout)
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


async def run_tunnel(addresses: list[str], cert: str, key: str, ca: str,
                     timeout: float) -> int:
    try:
        ctx = client_context(cert, key, ca)
    except ValueError as e:
        print(f"p11gate tunnel: {e}", file=sys.stderr)
        return 2
    try:
        # each tunnel is one process with one connection: a random first gateway spreads
        # the applications over the nodes; the others are tried in order after it
        r, w, _ = await open_tls(addresses, ctx, timeout, random.randrange(len(addresses)))
    except NoGateway as e:
        print(f"p11gate tunnel: {e}", file=sys.stderr)
        return 1
    local = await _stdio()
    await splice(local, (r, w))
    return 0

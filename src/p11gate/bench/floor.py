"""`python -m p11gate.bench.floor`: the least Python p11-kit RPC server that can be built on
p11gate's own codec, as a yardstick for issue 11 (the bench's opt-in `floor` and
`floor-echo` targets; see docs/benchmarks.md, "The Python floor").

One asyncio unix-socket server, on the same event loop as the gateway (uvloop when it is
installed, as `[server] uvloop = true` does), that for every frame decodes the request
with the codec, calls the module *in-line on the loop thread* through the native binding
(`backends.native.NativeModule`) and writes the encoded reply. Deliberately nothing else:
no policy, no handle translation (clients see the module's own handles), no thread
hand-off, no deadlines, no ordering, no flow control, no audit, metrics or logging. Any
feature the gateway has costs more than this, so what this server spends per call is a
lower bound for a Python gateway on this machine, codec and event loop included.

`--echo` answers C_GenerateRandom from `os.urandom` without calling the module (every
other call still goes to it, so the load generator's set-up works unchanged): the
difference to the plain floor is the module's own work plus the cffi call, and what is
left is the cost of asyncio, the socket and the codec alone.

Prints `P11_KIT_SERVER_ADDRESS=unix:path=...;` once listening, like `p11gate serve` and
`p11-kit server`; SIGTERM or SIGINT stops it and finalizes the module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, cast

from ..backends.native import NativeModule
from ..codec import (
    HANDSHAKE,
    MAX_VERSION,
    ArgumentError,
    CodecError,
    FrameReader,
    build_frame,
    ckr,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
)
from ..codec.tables import Dialect
from ..errors import Pkcs11Error

# plain ints, not the CallId IntEnum: compared on every call
C_INITIALIZE, C_FINALIZE, C_GENERATE_RANDOM = 1, 2, 64


class FloorConnection(asyncio.Protocol):
    """One client: version byte, then frames answered strictly in arrival order."""

    __slots__ = ("dialect", "echo", "module", "reader", "transport")

    def __init__(self, module: NativeModule, echo: bool) -> None:
        self.module = module
        self.echo = echo
        self.reader = FrameReader()
        self.dialect: Dialect | None = None  # until the client's version byte
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write()
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.dialect is None:
            offered = data[0]
            self.dialect = dialect_for_version(offered)
            # the module's attribute table follows the client's dialect; every client of
            # one bench run speaks the same, so one module-wide setting is enough here
            self.module.set_dialect(self.dialect)
            transport.write(bytes([min(offered, MAX_VERSION)]))
            data = data[1:]
            if not data:
                return
        try:
            for frame in self.reader.feed(data):
                transport.write(build_frame(frame.code, self.answer(frame.body)))
        except CodecError:  # framing or signature error: the stream cannot be trusted
            transport.abort()

    def answer(self, body: bytes) -> bytes:
        d = self.dialect
        assert d is not None
        try:
            call, args = decode_request(body, d)
        except ArgumentError as e:
            return encode_error(e.rv)
        cid = call.id
        if cid > C_FINALIZE:
            try:
                if cid == C_GENERATE_RANDOM and self.echo:
                    values: list[Any] = [os.urandom(args[1])]
                else:
                    values = self.module.call(cid, args)
                return encode_reply(cid, values, d, args)
            except (Pkcs11Error, ArgumentError) as e:
                return encode_error(e.rv)
            except (TypeError, ValueError, OverflowError):  # e.g. a NULL capacity to echo
                return encode_error(ckr.ARGUMENTS_BAD)
        if cid == C_INITIALIZE and args[0] != HANDSHAKE:
            return encode_error(ckr.GENERAL_ERROR)
        # the module was initialized at start and stays so until the server stops, as
        # the gateway does: C_Initialize and C_Finalize only end the client's handshake
        return encode_reply(cid, [], d)


async def serve(path: str, module: NativeModule, echo: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: FloorConnection(module, echo), path)
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    print(f"P11_KIT_SERVER_ADDRESS=unix:path={path}; export P11_KIT_SERVER_ADDRESS;",
          flush=True)
    try:
        await stop
    finally:
        server.close()


def run_loop(main: Coroutine[Any, Any, None], loop_name: str) -> None:
    """Run ``main`` on the event loop the gateway would use: uvloop when installed
    (daemon.py: ``[server] uvloop = true`` is the default), else asyncio's."""
    if loop_name == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p11gate.bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", required=True, help="the PKCS#11 module (.so) to serve")
    p.add_argument("--socket", required=True, help="unix socket path to listen on")
    p.add_argument("--echo", action="store_true",
                   help="answer C_GenerateRandom from os.urandom, not the module")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop (uvloop falls back to asyncio's when not installed)")
    a = p.parse_args(argv)
    try:
        module = NativeModule(a.module)
        module.initialize()
    except (OSError, Pkcs11Error) as e:
        print(f"floor: {e}", file=sys.stderr)
        return 1
    try:
        run_loop(serve(a.socket, module, a.echo), a.loop)
    finally:
        module.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())

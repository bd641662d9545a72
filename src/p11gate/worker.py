"""`p11gate worker MODULE`: serve one PKCS#11 module over p11-kit RPC on stdin/stdout.

The gateway starts one worker per vendor module (process isolation) with one end of a
socketpair as both stdin and stdout; separate pipes work too. On the wire the worker is
a drop-in for ``p11-kit remote MODULE``: it reads the client's version byte, answers
``min(offer, 2)``, then answers request frames, echoing each call code. Unlike
``p11-kit remote`` it works on up to ``threads`` calls at once and writes each reply as
soon as its call finishes, so replies may leave out of order (clients match them by
call code).

Threads never hand work to each other. All idle threads wait in one ``epoll`` set on
the input with EPOLLONESHOT, so the kernel wakes exactly one of them when a request
arrives; that thread reads, re-arms the input (an idle thread now watches it again),
performs the call and writes the reply itself. One call at a time therefore costs a
single thread wake-up, as in a single-threaded server, while a request arriving during
a slow call is picked up by another thread. Frames that arrive together (pipelining)
wake further threads through an eventfd. Without epoll (not Linux) the threads take
turns holding a read lock instead.

C_Initialize checks the handshake string and initializes the module once (with
``--init-reserved`` if given, else the client's reserved string); C_Finalize is
answered OK and the module is finalized at exit. EOF at a frame boundary → exit 0; a
malformed frame, EOF inside a frame or a broken stream → exit 1.
"""

from __future__ import annotations

import collections
import os
import select
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from .backends.native import NativeModule
from .codec import (
    CALLS_BY_NAME,
    HANDSHAKE,
    MAX_VERSION,
    ArgumentError,
    Call,
    CodecError,
    Dialect,
    FrameReader,
    ProtocolError,
    build_frame,
    ckr,
    decode_request,
    dialect_for_version,
    encode_error,
    encode_reply,
)
from .codec.chains import CHAIN_OPTIONS, decode_chain, encode_chain
from .codec.message import reply_rv
from .errors import Pkcs11Error

C_Initialize = 1
C_Finalize = 2
#: the calls a chain may hold (codec.chains): a search, nothing else
CHAINABLE = frozenset(CALLS_BY_NAME[n].id for n in
                      ("C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal"))
_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT if hasattr(select, "EPOLLONESHOT") else 0
READ_SIZE = 256 * 1024
#: how long to wait at exit for calls still running before finalizing the module
EXIT_GRACE = 5.0


def _log(msg: str) -> None:
    try:
        os.write(2, f"p11gate worker[{os.getpid()}]: {msg}\n".encode(errors="replace"))
    except OSError:
        pass


def _claim_stdio() -> tuple[int, int]:
    """Take private copies of fds 0/1 for the protocol and point 0 at /dev/null and 1 at
    stderr, so that a module (or anything else) printing to stdout cannot corrupt the
    stream nor read from it."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        os.dup2(2, 1)
    except OSError:
        os.dup2(devnull, 1)
    os.close(devnull)
    return in_fd, out_fd


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class _Server:
    def __init__(
        self,
        module: NativeModule,
        in_fd: int,
        out_fd: int,
        dialect: Dialect,
        init_reserved: str | None,
    ) -> None:
        self.module = module
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.dialect = dialect
        self.init_reserved = init_reserved
        self.reader = FrameReader()
        # one preallocated read buffer (only the read-lock holder uses it)
        self.rbuf = bytearray(READ_SIZE)
        self.rview = memoryview(self.rbuf)
        self.rbufs = [self.rbuf]
        self.pending: collections.deque[Any] = collections.deque()
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.done = threading.Event()
        self.stop_fd = -1
        self.work_fd = -1
        self.closed = False
        self.status = 0
        self.initialized = False

    # ---------------------------------------------------------------- stream

    def close(self, status: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.status = status
            if reason:
                _log(reason)
            if self.stop_fd >= 0:
                os.eventfd_write(self.stop_fd, 1)
            self.done.set()

    def _decode(self, frame: Any) -> tuple[Call | None, Any] | None:
        """Decode a frame (caller holds the read lock). C_Initialize/C_Finalize are
        answered here, in stream order; errors are answered or close the stream. A chain
        (codec.chains) decodes to ``(None, [(call, args) or an error reply, ...])``."""
        if frame.options == CHAIN_OPTIONS:
            return self._decode_chain(frame)
        try:
            call, args = decode_request(frame.body, self.dialect)
        except ArgumentError as e:
            self.write(frame.code, encode_error(e.rv))
            return None
        except CodecError as e:
            self.close(1, f"bad request: {e}")
            return None
        if call.id <= C_Finalize:
            self.write(frame.code, self.lifecycle(call, args))
            return None
        return call, args

    def _decode_chain(self, frame: Any) -> tuple[None, list[Any]] | None:
        """A chain's requests, decoded: a request the codec refuses ends the chain with
        its error reply; anything but a search's calls is a broken gateway."""
        try:
            bodies = decode_chain(frame.body)
        except ProtocolError as e:
            self.close(1, f"bad chain: {e}")
            return None
        steps: list[Any] = []
        for body in bodies:
            try:
                call, args = decode_request(body, self.dialect)
            except ArgumentError as e:
                steps.append(encode_error(e.rv))
                break
            except CodecError as e:
                self.close(1, f"bad request in a chain: {e}")
                return None
            if call.id not in CHAINABLE:
                self.close(1, f"{call.name} in a chain")
                return None
            steps.append((call, args))
        return None, steps

    def run_chain(self, steps: list[Any]) -> bytes:
        """Each request in turn on this thread; after the first error reply, no more."""
        replies = []
        for step in steps:
            body = step if isinstance(step, bytes) else self.execute(*step)
            replies.append(body)
            if reply_rv(body) != ckr.OK:
                break
        return encode_chain(replies)

    def _next_frame(self) -> Any:
        """Next complete frame, reading as needed (caller holds the read lock)."""
        pending = self.pending
        while not pending:
            if self._read_more(nonblocking=False) is None:
                return None
        return pending.popleft()

    def _read_more(self, nonblocking: bool) -> int | None:
        """One read of the input, its complete frames appended to ``pending`` (caller
        holds the read lock). Returns the bytes read; 0 when ``nonblocking`` and nothing
        is there yet; None when the stream is closed (end of stream, read error,
        malformed frame). Without ``nonblocking`` a would-block is a read error, as for
        an input that should block."""
        try:
            n = os.readv(self.in_fd, self.rbufs)
        except OSError as e:
            if nonblocking and isinstance(e, BlockingIOError):
                return 0
            self.close(1, f"read failed: {e}")
            return None
        if not n:
            if self.reader.pending():
                self.close(1, "end of stream inside a frame")
            else:
                self.close(0)
            return None
        try:
            self.pending.extend(self.reader.feed(cast(bytes, self.rview[:n])))
        except ProtocolError as e:
            self.close(1, f"protocol error: {e}")
            return None
        return n

    def write(self, code: int, body: bytes, options: bytes = b"") -> None:
        data = build_frame(code, body, options)
        with self.write_lock:
            try:
                n = os.write(self.out_fd, data)
                if n < len(data):
                    self._write_rest(memoryview(data)[n:])
            except BlockingIOError:  # the socket is shared with the non-blocking input
                self._write_rest(memoryview(data))
            except OSError as e:
                self.close(1, f"write failed: {e}")

    def _write_rest(self, data: memoryview) -> None:
        poller = select.poll()
        poller.register(self.out_fd, select.POLLOUT)
        try:
            while data:
                try:
                    data = data[os.write(self.out_fd, data) :]
                except BlockingIOError:
                    poller.poll()
        except OSError as e:
            self.close(1, f"write failed: {e}")

    # ---------------------------------------------------------------- threads: epoll

    def start_epoll(self) -> None:
        os.set_blocking(self.in_fd, False)
        self.ep = select.epoll()
        self.work_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.ep.register(self.in_fd, _ONESHOT)
        self.ep.register(self.work_fd, _ONESHOT)
        self.ep.register(self.stop_fd, select.EPOLLIN)  # level: wakes every thread

    def loop_epoll(self) -> None:
        poll = self.ep.poll
        while not self.closed:
            for fd, _ in poll(-1, 1):
                if fd == self.stop_fd:
                    return
                job = self._take(fd)
                if job is not None:
                    code, call, args = job
                    if call is not None:
                        self.write(code, self.execute(call, args))
                    else:  # a chain's reply is marked as one, like its request
                        self.write(code, self.run_chain(args), CHAIN_OPTIONS)

    def _take(self, fd: int) -> tuple[int, Call | None, Any] | None:
        """After a wake-up on ``fd``: the next frame to work on, if any."""
        with self.read_lock:
            if self.closed:
                return None
            pending = self.pending
            if fd == self.work_fd:
                try:
                    os.eventfd_read(self.work_fd)
                except BlockingIOError:
                    pass
            elif not pending:
                while True:  # drain what is there (non-blocking)
                    n = self._read_more(nonblocking=True)
                    if n is None:
                        return None
                    if n < READ_SIZE:  # a short read (0: nothing there) drained it
                        break
            frame = pending.popleft() if pending else None
            self.ep.modify(fd, _ONESHOT)  # re-arm: an idle thread watches it again
            if pending:  # more frames: wake another thread for them
                os.eventfd_write(self.work_fd, 1)
            if frame is None:
                return None
            decoded = self._decode(frame)
            if decoded is None:
                return None
            return frame.code, decoded[0], decoded[1]

    # ---------------------------------------------------------------- threads: lock

    def loop_lock(self) -> None:
        """Leader/follower without epoll: the read-lock holder blocks in read()."""
        while True:
            with self.read_lock:
                if self.closed:
                    return
                frame = self._next_frame()
                if frame is None:
                    return
                decoded = self._decode(frame)
                if decoded is None:
                    continue
            call, args = decoded
            if call is not None:
                self.write(frame.code, self.execute(call, args))
            else:
                self.write(frame.code, self.run_chain(args), CHAIN_OPTIONS)

    # ---------------------------------------------------------------- calls

    def execute(self, call: Call, args: list[Any]) -> bytes:
        try:
            return encode_reply(call.id, self.module.call(call.id, args), self.dialect, args)
        except Pkcs11Error as e:
            return encode_error(e.rv)
        except ArgumentError as e:  # a value the codec cannot carry in this dialect
            return encode_error(e.rv)
        except Exception as e:  # never let one call take the worker down
            _log(f"{call.name}: {e!r}")
            return encode_error(ckr.DEVICE_ERROR)

    def lifecycle(self, call: Call, args: list[Any]) -> bytes:
        if call.id == C_Finalize:  # the module stays up until the stream ends
            return encode_reply(C_Finalize, [], self.dialect)
        handshake, has_reserved, reserved = args
        if handshake != HANDSHAKE:
            return encode_error(ckr.GENERAL_ERROR)
        if not self.initialized:
            init_reserved: str | bytes | None = self.init_reserved
            if init_reserved is None and has_reserved and isinstance(reserved, bytes):
                init_reserved = reserved.split(b"\0", 1)[0]
            try:
                self.module.initialize(init_reserved)
            except Pkcs11Error as e:
                return encode_error(e.rv)
            self.initialized = True
        return encode_reply(C_Initialize, [], self.dialect)


def main(module: str, threads: int = 4, init_reserved: str | None = None,
         raw_parameter_mechanisms: Sequence[int] = ()) -> int:
    """Run the worker on stdin/stdout until the stream ends; return the exit status.
    ``raw_parameter_mechanisms``: vendor mechanisms whose raw parameter bytes may reach
    the module (every other raw parameter is checked against the flat list)."""
    in_fd, out_fd = _claim_stdio()
    try:
        mod = NativeModule(module, raw_parameter_mechanisms=raw_parameter_mechanisms)
    except (OSError, Pkcs11Error) as e:
        _log(str(e))
        return 1

    offer = _read_exact(in_fd, 1)
    if not offer:
        return 0
    try:
        os.write(out_fd, bytes([min(offer[0], MAX_VERSION)]))
    except OSError as e:
        _log(f"write failed: {e}")
        return 1
    dialect = dialect_for_version(offer[0])
    mod.set_dialect(dialect)

    server = _Server(mod, in_fd, out_fd, dialect, init_reserved)
    target = server.loop_lock
    if hasattr(select, "epoll") and hasattr(os, "eventfd"):
        server.start_epoll()
        target = server.loop_epoll
    workers = [
        threading.Thread(target=target, name=f"p11-{i}", daemon=True)
        for i in range(max(1, threads))
    ]
    for t in workers:
        t.start()
    server.done.wait()

    deadline = time.monotonic() + EXIT_GRACE
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in workers):
        # a call is stuck in the module: finalizing under it is undefined behaviour and
        # interpreter shutdown could hang on it, so leave at once
        _log("calls still running at exit; not finalizing the module")
        sys.stderr.flush()
        os._exit(server.status)
    if server.initialized:
        try:
            mod.finalize()
        except Pkcs11Error as e:
            _log(f"C_Finalize: {e}")
    return server.status

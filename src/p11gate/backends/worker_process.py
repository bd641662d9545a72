"""The `process` isolation mode: the vendor module runs in a supervised worker process.

The gateway talks p11-kit RPC to the worker over a socketpair (the worker's stdin and
stdout). Every call has a deadline; a worker that misses it is killed. A dead worker
is restarted after ``restart_delay``; calls made while it is down fail at once with
CKR_DEVICE_ERROR, and everything bound to the old instance (sessions, handles, login)
is invalidated through ``generation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..config import BackendConfig
from ..errors import BackendUnavailable, DeadlineExceeded
from .base import Backend
from .deadlines import SLOW_CALLS
from .find_prefetch import NOT_RAW, WATCHED, FindPrefetch
from .rpc_client import RpcChannel, RpcClientProtocol
from .worker_env import worker_environment
from .worker_output import RestartFailures, WorkerOutput

log = logging.getLogger("p11gate.backend")

#: how long a fresh worker may take to answer the version byte and C_Initialize
START_TIMEOUT = 30.0
#: longest pause between two restart attempts (a module or token that is missing at
#: first may appear soon; after a minute of failures RestartFailures stretches it)
MAX_RESTART_DELAY = 5.0
#: how long a worker that died at start may take to finish writing its reason
OUTPUT_GRACE = 1.0


class WorkerBackend(Backend):
    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.raw_parameter_mechanisms = frozenset(cfg.raw_parameter_mechanisms)
        self._chan: RpcChannel | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._up = False
        self._up_event = asyncio.Event()
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.restarts = 0
        #: whether the worker was stopped (SIGSTOP, a debugger) when a call last missed
        #: its deadline: hung beyond doubt, not slow at that call (pool members read it)
        self.stopped_at_deadline = False
        self.last_error = ""
        self.failures = RestartFailures(cfg.name)
        self._output: WorkerOutput | None = None
        #: searches sent as chains (find_prefetch.py): only to p11gate's own worker,
        #: which runs them (``p11-kit remote`` and other worker commands do not)
        self._prefetch = FindPrefetch() if not cfg.worker_command else None

    @property
    def up(self) -> bool:
        return self._up

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def call_timeout(self) -> float:
        """The deadline of a call other than a key generation (a pool member's liveness
        probe is timed by it)."""
        return self.cfg.call_timeout

    def command(self) -> list[str]:
        if self.cfg.worker_command:
            return list(self.cfg.worker_command)
        cmd = [sys.executable, "-m", "p11gate.cli", "worker", self.cfg.module,
               "--threads", str(self.cfg.threads)]
        if self.cfg.init_reserved is not None:
            cmd += ["--init-reserved", self.cfg.init_reserved]
        for mtype in self.cfg.raw_parameter_mechanisms:
            cmd += ["--raw-parameter-mechanism", f"{mtype:#x}"]
        return cmd

    async def start(self) -> None:
        try:
            await self._spawn()
        except BackendUnavailable as e:
            # keep trying in the background (with backoff): a module or token that is
            # not there yet at start-up may be there soon
            self.last_error = str(e)
            self.failures.failed(str(e), self.cfg.restart_delay, log_it=False)
            if not self._stopping:
                self._restart_task = asyncio.create_task(self._restart())
            raise

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            parent, child = socket.socketpair()
        except OSError as e:  # EMFILE/ENFILE: out of file descriptors
            raise BackendUnavailable(f"cannot start worker: socketpair: {e}") from e
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=child.fileno(),
                stdout=child.fileno(),
                # its own words (loader errors, vendor messages) become log records
                stderr=asyncio.subprocess.PIPE,
                # only what a program needs plus the backend's env: never the
                # gateway's own secrets (the backend PIN's variable among them)
                env=worker_environment(self.cfg.env),
                # its own process group: a terminal's ^C goes to the gateway, which
                # then stops workers in order
                start_new_session=True,
            )
        except OSError as e:
            parent.close()
            raise BackendUnavailable(f"cannot start worker {self.command()[0]}: {e}") from e
        finally:
            child.close()
        self._proc = proc
        assert proc.stderr is not None
        output = self._output = WorkerOutput(self.name, proc.pid, proc.stderr,
                                             self.failures.verbose)
        try:
            _, proto = await loop.create_connection(RpcClientProtocol, sock=parent)
            proto.on_lost = functools.partial(self._lost, proc)
            await proto.handshake(START_TIMEOUT)
            chan = RpcChannel(proto, self.cfg.call_timeout)
            await asyncio.wait_for(chan.initialize(self.cfg.init_reserved), START_TIMEOUT)
        except BaseException as e:
            self._kill(proc)
            # the worker's own last words (the loader's error) say more than a closed pipe
            await output.finished(OUTPUT_GRACE)
            why = output.last() or repr(e)
            raise BackendUnavailable(f"worker for {self.name} failed to start: {why}") from e
        self.failures.recovered()
        if self._prefetch is not None:
            self._prefetch.clear()  # the last instance's sessions are gone
        self._chan = chan
        self.generation += 1
        self._up = True
        self._up_event.set()
        log.info("backend up", extra={"backend": self.name, "pid": proc.pid,
                                      "generation": self.generation,
                                      "dialect": chan.dialect.name})
        self._watch_task = asyncio.create_task(self._watch(proto, proc))

    async def _watch(self, proto: RpcClientProtocol, proc: asyncio.subprocess.Process) -> None:
        either: list[asyncio.Future[Any]] = [proto.closed, asyncio.ensure_future(proc.wait())]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if proc is self._proc:
            self._down(proto.close_reason or f"worker exited ({proc.returncode})")

    def _lost(self, proc: asyncio.subprocess.Process, reason: str) -> None:
        if proc is self._proc:
            self._down(reason)

    def _down(self, reason: str) -> None:
        if not self._up:
            return
        self._up = False
        self._up_event.clear()
        # everything bound to the dead instance is invalid from now on, not only once
        # the replacement is up
        self.generation += 1
        self.last_error = reason
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.proto.close()
        if self._proc is not None:
            self._kill(self._proc)
        log.warning("backend down", extra={"backend": self.name, "reason": reason})
        if not self._stopping and (self._restart_task is None or self._restart_task.done()):
            self._restart_task = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        delay = self.cfg.restart_delay
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except Exception as e:
                # whatever goes wrong (out of descriptors, a fork failure, a bug), the
                # supervisor keeps going: log it and retry with back-off
                self.last_error = str(e)
                delay = min(max(delay * 2, 0.1), self.failures.max_delay(MAX_RESTART_DELAY))
                self.failures.failed(str(e), delay)  # logged a few times, then summarised
                continue
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    await self.on_restart()
                except Exception:
                    log.exception("after-restart hook failed", extra={"backend": self.name})
            return

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        try:
            return await self.submit(call_id, args)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded") from None

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        # Nothing may await between the frontend's generation check and the send: the
        # handles in ``args`` belong to this instance and must reach this instance.
        chan = self._chan
        if chan is None:
            raise BackendUnavailable(f"backend {self.name} is restarting")
        if call_id in WATCHED and self._prefetch is not None:
            return self._prefetch.submit(
                functools.partial(chan.submit_chain, on_timeout=self._deadline_missed),
                chan.proto._loop, call_id, args,
                lambda: chan.submit(call_id, args, None, self._deadline_missed))
        timeout = self.cfg.keygen_timeout if call_id in SLOW_CALLS else None
        return chan.submit(call_id, args, timeout, self._deadline_missed)

    def submit_raw(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes] | None:
        chan = self._chan
        if chan is None:
            raise BackendUnavailable(f"backend {self.name} is restarting")
        if call_id > chan.dialect.max_call_id or call_id in SLOW_CALLS:
            return None
        if call_id in WATCHED and self._prefetch is not None:
            if call_id in NOT_RAW:
                return None  # submit chains or answers them
            self._prefetch.forget(call_id, args)
        return chan.submit_raw(call_id, args, self._deadline_missed)

    def submit_body(self, call_id: int, body: bytes, dialect: Any) -> asyncio.Future[bytes] | None:
        # Nothing may await between the frontend's generation check and the send (see
        # submit); the body's handles must already be this instance's.
        chan = self._chan
        if chan is None:
            raise BackendUnavailable(f"backend {self.name} is restarting")
        d = chan.dialect
        # version 0 peers need some arguments rewritten (RpcChannel.submit), so not those
        if dialect is not d or d.version == 0 or call_id > d.max_call_id or call_id in SLOW_CALLS:
            return None
        if call_id in WATCHED and self._prefetch is not None:
            return None  # submit keeps the searches' batches right
        return chan.submit_body(call_id, body, self._deadline_missed)

    def submit_search(self, session: int,
                      template: list[Any]) -> asyncio.Future[list[int] | None] | None:
        chan = self._chan
        if chan is None:
            raise BackendUnavailable(f"backend {self.name} is restarting")
        if self._prefetch is None:
            return None
        return self._prefetch.search(
            functools.partial(chan.submit_chain, on_timeout=self._deadline_missed),
            chan.proto._loop, session, template,
            lambda c, a: chan.submit(c, a, None, self._deadline_missed))

    def _deadline_missed(self) -> None:
        proc = self._proc
        self.stopped_at_deadline = proc is not None and _stopped(proc.pid)
        self._down(f"a call missed its deadline (call_timeout {self.cfg.call_timeout}s, "
                   f"keygen_timeout {self.cfg.keygen_timeout}s)"
                   + ("; the worker was stopped" if self.stopped_at_deadline else ""))

    async def wait_up(self, timeout: float) -> bool:
        if not self._up and not self._stopping:
            try:
                await asyncio.wait_for(self._up_event.wait(), timeout)
            except TimeoutError:
                pass
        return self._up

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        self._up = False
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.proto.close()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                self._kill(proc)
                await proc.wait()
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._output is not None:
            # what the worker wrote before it exited is read; a grandchild that still
            # holds the pipe open does not keep the gateway from stopping
            await self._output.finished(0.5)
            self._output.task.cancel()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "isolation": "process", "pid": self.pid,
                "restarts": self.restarts, "last_error": self.last_error}


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T or t in /proc; False where unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"T", b"t")

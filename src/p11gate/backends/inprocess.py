"""The `none` isolation mode: the vendor module is loaded into the gateway process and
called from a thread pool (lowest latency: no IPC, no encoding).

What this mode cannot do is protect the gateway. A module that crashes takes the
gateway with it, and a call that hangs cannot be interrupted: a thread cannot be killed
in-process. Every call still has a deadline (``call_timeout``): when it passes, the
caller gets :class:`~p11gate.errors.BackendUnavailable` at once, the thread is counted
as hung (logged, shown by :meth:`describe`) until the module returns, and while every
thread is hung the back end reports itself down. A call still queued for a thread at
its deadline is simply cancelled. For modules that may hang or crash, use process
isolation (``isolation = "process"``): its worker is killed on a missed deadline and
restarted.

Module threads are native threads by default (``executor``: see
:mod:`~p11gate.backends.native.executor`): the loop marshals each call's arguments and a
POSIX thread makes the C call without the GIL, so a call costs no GIL hand-off. Where
the executor cannot be built or used (no C compiler, another ABI), or for the few calls
with a parameter that is not a CK_ULONG or a pointer (C_GetSlotList), Python threads
call the module instead, as ``executor = "threads"`` does for all calls.

``env`` (the backend's configured environment, e.g. SOFTHSM2_CONF) is applied to this
process's ``os.environ`` before the module is loaded and initialized, since the module
reads the gateway's own environment; it is process-wide, so two in-process back ends
must not need different values for the same variable (a conflict is logged).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..codec import ckr
from ..codec.calls import CALLS
from ..errors import BackendUnavailable, DeadlineExceeded, Pkcs11Error
from .base import Backend
from .deadlines import deadline
from .native import DEFAULT_MAX_BUFFER, NativeModule
from .native.cdef import ffi
from .native.executor import ExecutorUnavailable, NativeExecutor, arg_kinds

log = logging.getLogger("p11gate.backend")
_NEVER = float("inf")



class _Job:
    __slots__ = ("args", "call_id", "cancelled", "cargs", "error", "index", "keep", "out",
                 "result", "run", "started", "tag", "timeout")

    def __init__(self, call_id: int, args: list[Any], out: asyncio.Future[list[Any]],
                 timeout: float) -> None:
        self.call_id = call_id
        self.args = args
        self.out = out
        self.timeout = timeout
        self.started = False
        self.cancelled = False
        self.result: list[Any] = []
        self.error: BaseException | None = None
        # native executor only: the call's run (NativeModule.begin) and C arguments, the
        # buffers made for them (all alive until the thread is done with them), its slot
        self.run: Any = None
        self.cargs: Any = None
        self.keep: list[Any] | None = None
        self.index = -1
        self.tag = 0


class InProcessBackend(Backend):
    def __init__(
        self,
        name: str,
        module_path: str,
        threads: int = 4,
        call_timeout: float = 30.0,
        init_reserved: str | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        env: Mapping[str, str] | None = None,
        raw_parameter_mechanisms: Iterable[int] = (),
        keygen_timeout: float | None = None,
        executor: str = "auto",
        native_capacity: int = 4096,
    ) -> None:
        if executor not in ("auto", "native", "threads"):
            raise ValueError(f"executor: {executor!r}: one of auto, native, threads")
        self.name = name
        #: "native": module calls on native threads (refuse to start without them);
        #: "threads": on Python threads; "auto": native where it can be built
        self.executor = executor
        #: calls the native executor holds at once (queued or running); more wait here
        self.native_capacity = native_capacity
        self.raw_parameter_mechanisms = frozenset(raw_parameter_mechanisms)
        self.env = dict(env or {})
        self.module_path = module_path
        self.threads = max(1, threads)
        self.call_timeout = call_timeout
        #: deadline of key and parameter generation (see deadlines.py)
        self.keygen_timeout = keygen_timeout if keygen_timeout is not None else call_timeout
        self.init_reserved = init_reserved
        self.max_buffer = max_buffer
        self._module: NativeModule | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up = False
        #: calls past their deadline that are still inside the module → start time
        self._hung: dict[_Job, float] = {}
        self._calls: queue.SimpleQueue[_Job | None] | None = None
        self._done: collections.deque[_Job] = collections.deque()
        self._state = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._bell_r = self._bell_w = -1
        #: a byte is in the doorbell pipe that the loop has not read: under load, module
        #: threads finishing meanwhile skip their write (one wake-up, one syscall, many
        #: replies)
        self._bell_rung = False
        #: calls not yet back from their thread → deadline (loop time); one timer, armed
        #: at the earliest, serves them all (a call costs no timer of its own)
        self._deadlines: dict[_Job, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self.timeouts = 0
        self._native: NativeExecutor | None = None
        #: per call id: (function address, parameter kinds) for the native executor,
        #: None for a call that stays on a Python thread
        self._native_calls: list[tuple[int, tuple[int, ...]] | None] = []
        #: native jobs in flight by tag, and those waiting for a free job slot
        self._native_jobs: dict[int, _Job] = {}
        self._overflow: collections.deque[_Job] = collections.deque()
        #: why the native executor is not used (None when it is)
        self.executor_note: str | None = None

    @property
    def executor_in_use(self) -> str:
        return "native" if self._native is not None else "threads"

    @property
    def up(self) -> bool:
        return self._up and len(self._hung) < self.threads

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix=f"p11-{self.name}"
        )

        for key, value in self.env.items():
            old = os.environ.get(key)
            if old is not None and old != value:
                log.warning(
                    "environment variable overridden for an in-process module",
                    extra={"backend": self.name, "variable": key},
                )
            os.environ[key] = value

        def load() -> NativeModule:
            m = NativeModule(self.module_path, self.init_reserved, max_buffer=self.max_buffer,
                             raw_parameter_mechanisms=self.raw_parameter_mechanisms)
            m.initialize()
            return m

        try:
            module = await asyncio.wait_for(loop.run_in_executor(pool, load), self.call_timeout)
        except TimeoutError:
            pool.shutdown(wait=False)
            raise BackendUnavailable(
                f"{self.module_path}: C_Initialize did not return within {self.call_timeout}s"
            ) from None
        except (OSError, Pkcs11Error) as e:
            pool.shutdown(wait=False)
            raise BackendUnavailable(f"{self.module_path}: {e}") from e
        pool.shutdown(wait=False)  # only used to load the module
        self._module = module
        if self.executor != "threads":
            try:
                self._start_native(loop, module)
            except ExecutorUnavailable as e:
                if self.executor == "native":
                    self._module = None
                    with contextlib.suppress(Pkcs11Error):
                        await loop.run_in_executor(None, module.finalize)
                    raise BackendUnavailable(f"{self.name}: native executor: {e}") from None
                self.executor_note = str(e)
                log.warning("native executor unavailable; module calls on Python threads",
                            extra={"backend": self.name, "reason": str(e)})
        self._calls = queue.SimpleQueue()
        self._bell_r, self._bell_w = os.pipe()
        os.set_blocking(self._bell_r, False)
        loop.add_reader(self._bell_r, self._drain)
        self._threads = [
            threading.Thread(target=self._serve_calls, name=f"p11-{self.name}-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in self._threads:
            t.start()
        self.generation += 1
        self._up = True
        log.info(
            "backend up",
            extra={
                "backend": self.name,
                "isolation": "none",
                "executor": self.executor_in_use,
                "generation": self.generation,
                "interface": f"{module.interface_version[0]}.{module.interface_version[1]}",
            },
        )

    async def stop(self) -> None:
        self._up = False
        module, calls = self._module, self._calls
        self._module = None
        if calls is None or module is None:
            return
        self._calls = None
        for _ in self._threads:
            calls.put(None)
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._bell_r)
        await loop.run_in_executor(None, self._join_threads)
        self._drain()
        await self._stop_native(loop)
        for job in list(self._deadlines):  # still inside the module: answered now
            if not job.out.done():
                job.out.set_exception(BackendUnavailable(
                    f"backend {self.name} stopped while the call was in the module"))
        for fd in (self._bell_r, self._bell_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        native_busy = self._native.busy() if self._native is not None else 0
        if self._hung or native_busy:
            # finalizing under a call that is still inside the module is undefined
            log.warning(
                "not finalizing: calls still inside the module",
                extra={"backend": self.name, "hung_calls": len(self._hung),
                       "native_calls": native_busy},
            )
            return
        try:
            await asyncio.wait_for(loop.run_in_executor(None, module.finalize), self.call_timeout)
        except (TimeoutError, Pkcs11Error) as e:
            log.warning("C_Finalize failed", extra={"backend": self.name, "reason": repr(e)})

    def _start_native(self, loop: asyncio.AbstractEventLoop, module: NativeModule) -> None:
        native = NativeExecutor(self.threads, self.native_capacity)
        table: list[tuple[int, tuple[int, ...]] | None] = []
        for call_id in range(len(CALLS)):
            fn = module.function(call_id)
            kinds = arg_kinds(fn)
            table.append(None if fn is None or kinds is None
                         else (int(ffi.cast("uintptr_t", fn)), kinds))
        self._native, self._native_calls = native, table
        loop.add_reader(native.bell_fd, self._drain_native)

    async def _stop_native(self, loop: asyncio.AbstractEventLoop) -> None:
        native = self._native
        if native is None:
            return
        loop.remove_reader(native.bell_fd)
        for job in self._overflow:
            job.run.close()
            if not job.out.done():
                job.out.set_exception(BackendUnavailable(f"backend {self.name} stopped"))
        self._overflow.clear()
        deadline = time.monotonic() + 2.0
        while native.stop() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # queued calls are made first, as with threads
        self._drain_native()
        if native.free():
            self._native = None
        else:  # a thread is still inside the module: it may yet write to the executor
            log.warning("native threads still in the module at stop; left running",
                        extra={"backend": self.name, "busy": native.busy()})

    def _join_threads(self) -> None:
        deadline = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        return await self.submit(call_id, args)

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        module, calls, loop = self._module, self._calls, self._loop
        if not self._up or module is None or calls is None or loop is None:
            raise BackendUnavailable(f"backend {self.name} is not running")
        out: asyncio.Future[list[Any]] = loop.create_future()
        timeout = deadline(call_id, self.call_timeout, self.keygen_timeout)
        job = _Job(call_id, args, out, timeout)
        native = self._native
        plan = None
        if native is not None and 0 <= call_id < len(self._native_calls):
            plan = self._native_calls[call_id]
            if plan is not None and not self._submit_native(native, module, job, plan):
                return out  # failed at once (bad arguments)
        at = loop.time() + timeout
        self._deadlines[job] = at
        if at < self._timer_at:
            self._arm(loop, at)
        if plan is None:
            calls.put(job)
        return out

    def _submit_native(self, native: NativeExecutor, module: NativeModule, job: _Job,
                       plan: tuple[int, tuple[int, ...]]) -> bool:
        """Marshal on the loop, queue on a native thread. False: the call failed at
        once (its future holds the error)."""
        try:
            run, _fn, cargs = module.begin(job.call_id, job.args)
        except Exception as e:  # Pkcs11Error: refused before the module, as call() does
            job.out.set_exception(e)
            return False
        job.run, job.cargs = run, cargs
        try:
            queued = self._queue_native(native, job, plan)
        except (TypeError, OverflowError, ValueError) as e:
            run.close()
            job.out.set_exception(Pkcs11Error(ckr.ARGUMENTS_BAD, f"{CALLS[job.call_id].name}: {e}"))
            return False
        if queued is None:  # every job slot taken: waits here for one
            self._overflow.append(job)
        elif not queued:
            run.close()
            job.out.set_exception(BackendUnavailable(f"backend {self.name} is stopping"))
            return False
        return True

    def _queue_native(self, native: NativeExecutor, job: _Job,
                      plan: tuple[int, tuple[int, ...]]) -> bool | None:
        """Hand ``job`` to a native thread: True when queued, None when every job slot
        is taken, False when the executor is stopping."""
        keep: list[Any] = []
        index, tag = native.submit(plan[0], plan[1], job.cargs, keep)
        if index == -1:
            return None
        if index < 0:
            return False
        job.keep, job.index, job.tag = keep, index, tag
        self._native_jobs[tag] = job
        return True

    def _drain_native(self) -> None:
        native, module = self._native, self._module
        if native is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(native.bell_fd, 65536)
            native.bells += 1
        jobs = self._native_jobs
        for tag, rv in native.take():
            job = jobs.pop(tag, None)
            if job is None:
                continue
            self._deadlines.pop(job, None)
            self._returned(job)
            out, run = job.out, job.run
            job.run = job.cargs = job.keep = None
            if out.done() or module is None:  # expired meanwhile: only its buffers to free
                run.close()
                continue
            try:
                out.set_result(module.finish(job.call_id, run, rv))
            except Exception as e:
                out.set_exception(e)
        overflow = self._overflow
        while overflow:  # slots are free again: queue the calls that waited for one
            job = overflow[0]
            plan = self._native_calls[job.call_id]
            assert plan is not None
            queued = self._queue_native(native, job, plan)  # checked when first submitted
            if queued is None:
                break
            overflow.popleft()
            if not queued:
                job.run.close()
                if not job.out.done():
                    job.out.set_exception(BackendUnavailable(f"backend {self.name} stopped"))

    def _returned(self, job: _Job) -> None:
        hung = self._hung.pop(job, None)
        if hung is not None:
            log.warning(
                "hung call returned",
                extra={"backend": self.name, "call": CALLS[job.call_id].name,
                       "seconds": round(time.monotonic() - hung, 3)},
            )

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire_due)

    def _expire_due(self) -> None:
        """The earliest deadline has come: expire every call past its own, re-arm for
        the earliest left (calls back from their thread were taken out by _drain)."""
        self._timer, self._timer_at = None, _NEVER
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        due = [job for job, at in self._deadlines.items() if at <= now]
        for job in due:
            del self._deadlines[job]
            self._expire(job, job.timeout)
        if self._deadlines:
            self._arm(loop, min(self._deadlines.values()))

    def _serve_calls(self) -> None:
        """A module thread: take jobs, call the module, hand results back through the
        doorbell pipe. Lighter than ThreadPoolExecutor + call_soon_threadsafe: one queue
        get, one module call, and a 1-byte write only if the bell is not already rung."""
        calls, module, done, bell = self._calls, self._module, self._done, self._bell_w
        assert calls is not None and module is not None
        while True:
            job = calls.get()
            if job is None:
                return
            with self._state:
                if job.cancelled:
                    continue
                job.started = True
            try:
                job.result = module.call(job.call_id, job.args)
            except BaseException as e:  # delivered to the caller, never lost
                job.error = e
            done.append(job)
            if self._bell_rung:  # the loop has not drained yet: it will see this job too
                continue
            self._bell_rung = True
            try:
                os.write(bell, b"\0")
            except OSError:  # stopped meanwhile
                return

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._bell_r, 65536)
        # cleared after the pipe is read (a byte written before the read was by a thread
        # that set the flag first, so clearing now loses no bell) and before the queue
        # is emptied (a thread that saw the flag set appended its job before this, so
        # the loop below pops it; one that sees it clear rings again)
        self._bell_rung = False
        done = self._done
        while done:
            job = done.popleft()
            self._deadlines.pop(job, None)
            self._returned(job)
            out = job.out
            if out.done():
                continue
            if job.error is not None:
                out.set_exception(job.error)
            else:
                out.set_result(job.result)

    def _expire(self, job: _Job, timeout: float) -> None:
        out = job.out
        if out.done():
            return
        self.timeouts += 1
        name = CALLS[job.call_id].name if 0 <= job.call_id < len(CALLS) else str(job.call_id)
        if job.run is not None:  # on the native executor
            waiting = self._cancel_native(job)
        else:
            with self._state:
                waiting = not job.started
                job.cancelled = waiting
        if waiting:  # still waiting for a thread: nothing is stuck in the module
            out.set_exception(
                BackendUnavailable(f"{name}: no free thread within {timeout}s")
            )
            return
        # A thread cannot be killed: it stays inside the module until the module returns.
        self._hung[job] = time.monotonic() - timeout
        log.error(
            "call missed its deadline; its thread is hung in the module",
            extra={"backend": self.name, "call": name, "timeout": timeout,
                   "hung_calls": len(self._hung)},
        )
        out.set_exception(DeadlineExceeded(f"{name} missed its {timeout}s deadline"))

    def _cancel_native(self, job: _Job) -> bool:
        """True when the job never reached a thread (it is dropped); False when a
        thread is inside the module with it (its buffers stay alive until it returns)."""
        native = self._native
        if job in self._overflow:
            self._overflow.remove(job)
        elif native is None or not native.cancel(job.index, job.tag):
            return False
        else:
            self._native_jobs.pop(job.tag, None)
        job.run.close()
        job.run = job.cargs = job.keep = None
        return True

    def describe(self) -> dict[str, Any]:
        m = self._module
        return {
            **super().describe(),
            "isolation": "none",
            "module": self.module_path,
            "threads": self.threads,
            "executor": self.executor_in_use,
            "hung_calls": len(self._hung),
            "timeouts": self.timeouts,
            "interface": None
            if m is None
            else f"{m.interface_version[0]}.{m.interface_version[1]}",
        }

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

``env`` (the backend's configured environment, e.g. SOFTHSM2_CONF) is applied to this
process's ``os.environ`` before the module is loaded and initialized, since the module
reads the gateway's own environment; it is process-wide, so two in-process back ends
must not need different values for the same variable (a conflict is logged).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ..codec.calls import CALLS
from ..errors import BackendUnavailable, Pkcs11Error
from .base import Backend
from .native import DEFAULT_MAX_BUFFER, NativeModule

log = logging.getLogger("p11gate.backend")

_CFuture = concurrent.futures.Future[list[Any]]


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
    ) -> None:
        self.name = name
        self.env = dict(env or {})
        self.module_path = module_path
        self.threads = max(1, threads)
        self.call_timeout = call_timeout
        self.init_reserved = init_reserved
        self.max_buffer = max_buffer
        self._module: NativeModule | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up = False
        #: calls past their deadline that are still inside the module → start time
        self._hung: dict[_CFuture, tuple[int, float]] = {}
        self.timeouts = 0

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
            m = NativeModule(self.module_path, self.init_reserved, max_buffer=self.max_buffer)
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
        self._module = module
        self._pool = pool
        self.generation += 1
        self._up = True
        log.info(
            "backend up",
            extra={
                "backend": self.name,
                "isolation": "none",
                "generation": self.generation,
                "interface": f"{module.interface_version[0]}.{module.interface_version[1]}",
            },
        )

    async def stop(self) -> None:
        self._up = False
        module, pool = self._module, self._pool
        self._module = self._pool = None
        if pool is None or module is None:
            return
        pool.shutdown(wait=False, cancel_futures=True)
        if self._hung:
            # finalizing under a call that is still inside the module is undefined
            log.warning(
                "not finalizing: calls still hung in the module",
                extra={"backend": self.name, "hung_calls": len(self._hung)},
            )
            return
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, module.finalize), self.call_timeout)
        except (TimeoutError, Pkcs11Error) as e:
            log.warning("C_Finalize failed", extra={"backend": self.name, "reason": repr(e)})

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        return await self.submit(call_id, args)

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        module, pool, loop = self._module, self._pool, self._loop
        if not self._up or module is None or pool is None or loop is None:
            raise BackendUnavailable(f"backend {self.name} is not running")
        try:
            cf = pool.submit(module.call, call_id, args)
        except RuntimeError:  # shut down meanwhile
            raise BackendUnavailable(f"backend {self.name} is stopping") from None
        out: asyncio.Future[list[Any]] = loop.create_future()
        timer = loop.call_later(self.call_timeout, self._expire, cf, out, call_id)
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._deliver, f, out, timer))
        return out

    def _deliver(self, cf: _CFuture, out: asyncio.Future[list[Any]], timer: Any) -> None:
        timer.cancel()
        hung = self._hung.pop(cf, None)
        if hung is not None:
            log.warning(
                "hung call returned",
                extra={
                    "backend": self.name,
                    "call": CALLS[hung[0]].name,
                    "seconds": round(time.monotonic() - hung[1], 3),
                },
            )
        if out.done():
            return
        if cf.cancelled():
            out.set_exception(BackendUnavailable(f"backend {self.name} stopped"))
            return
        exc = cf.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(cf.result())

    def _expire(self, cf: _CFuture, out: asyncio.Future[list[Any]], call_id: int) -> None:
        if out.done():
            return
        self.timeouts += 1
        name = CALLS[call_id].name if 0 <= call_id < len(CALLS) else str(call_id)
        if cf.cancel():  # still waiting for a thread: nothing is stuck in the module
            out.set_exception(
                BackendUnavailable(f"{name}: no free thread within {self.call_timeout}s")
            )
            return
        # A thread cannot be killed: it stays inside the module until the module returns.
        self._hung[cf] = (call_id, time.monotonic() - self.call_timeout)
        log.error(
            "call missed its deadline; its thread is hung in the module",
            extra={
                "backend": self.name,
                "call": name,
                "timeout": self.call_timeout,
                "hung_calls": len(self._hung),
            },
        )
        out.set_exception(BackendUnavailable(f"{name} missed its {self.call_timeout}s deadline"))

    def describe(self) -> dict[str, Any]:
        m = self._module
        return {
            **super().describe(),
            "isolation": "none",
            "module": self.module_path,
            "threads": self.threads,
            "hung_calls": len(self._hung),
            "timeouts": self.timeouts,
            "interface": None
            if m is None
            else f"{m.interface_version[0]}.{m.interface_version[1]}",
        }

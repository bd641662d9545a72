"""A pool of KMIP connections, called from threads so the event loop never blocks.

PyKMIP's client is synchronous: each call runs on a worker thread holding one pooled
connection. A connection error closes that connection and the call fails with
CKR_DEVICE_ERROR (a Create or Sign cut off mid-way may or may not have happened on the
server, so it is not repeated); the next call opens a new connection, retrying with
back-off. KMIP operation failures (the server said no) keep the connection.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kmip.core import enums
from kmip.pie.client import ProxyKmipClient
from kmip.pie.exceptions import KmipOperationFailure

from ...codec import ckr
from ...errors import Pkcs11Error
from .config import KmipConfig
from .server_name import ServerNameMismatch, check_server_name
from .wire import BoundedProtocol

log = logging.getLogger("p11gate.backend")
T = TypeVar("T")

_VERSIONS = {"1.0": enums.KMIPVersion.KMIP_1_0, "1.1": enums.KMIPVersion.KMIP_1_1,
             "1.2": enums.KMIPVersion.KMIP_1_2, "1.3": enums.KMIPVersion.KMIP_1_3,
             "1.4": enums.KMIPVersion.KMIP_1_4, "2.0": enums.KMIPVersion.KMIP_2_0}

#: KMIP result reasons → the CK_RV a PKCS#11 caller expects
_REASONS = {
    enums.ResultReason.ITEM_NOT_FOUND: ckr.OBJECT_HANDLE_INVALID,
    enums.ResultReason.PERMISSION_DENIED: ckr.FUNCTION_REJECTED,
    enums.ResultReason.OPERATION_NOT_SUPPORTED: ckr.FUNCTION_NOT_SUPPORTED,
    enums.ResultReason.CRYPTOGRAPHIC_FAILURE: ckr.FUNCTION_FAILED,
    enums.ResultReason.INVALID_FIELD: ckr.MECHANISM_INVALID,
    enums.ResultReason.INVALID_MESSAGE: ckr.FUNCTION_FAILED,
    enums.ResultReason.WRONG_KEY_LIFECYCLE_STATE: ckr.KEY_FUNCTION_NOT_PERMITTED,
    enums.ResultReason.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK: ckr.KEY_FUNCTION_NOT_PERMITTED,
    enums.ResultReason.KEY_VALUE_NOT_PRESENT: ckr.KEY_HANDLE_INVALID,
}


class ConnectionLost(Exception):
    """The connection broke mid-call (reported as CKR_DEVICE_ERROR)."""


class KmipPool:
    def __init__(self, cfg: KmipConfig, backend: str) -> None:
        self.cfg = cfg
        self.backend = backend
        self._idle: queue.LifoQueue[ProxyKmipClient] = queue.LifoQueue()
        self._executor = ThreadPoolExecutor(cfg.pool_size, thread_name_prefix=f"kmip-{backend}")
        self._slots = asyncio.Semaphore(cfg.pool_size)
        self.errors = 0

    def _connect(self, deadline: float) -> ProxyKmipClient:
        cfg, delay = self.cfg, self.cfg.retry_backoff
        for attempt in range(cfg.retries + 1):
            if time.monotonic() >= deadline:
                break
            try:
                # (the password is read here, each time: a rotated file takes effect)
                client = ProxyKmipClient(
                    hostname=cfg.host, port=cfg.port, cert=cfg.cert, key=cfg.key, ca=cfg.ca,
                    ssl_version="PROTOCOL_SSLv23", username=cfg.username,
                    password=cfg.password(), config_file=None,
                    kmip_version=_VERSIONS[cfg.kmip_version])
                proxy = client.proxy
                proxy.timeout = cfg.timeout
                proxy.cert_reqs = ssl.CERT_REQUIRED
                client.open()
                try:
                    check_server_name(proxy.socket, cfg.server_name or cfg.host)
                except ServerNameMismatch:
                    _close(client)
                    raise
                # PyKMIP's reader would read whatever length the server announces, for
                # as long as it trickles in: this one has bounds (wire.py)
                proxy.protocol = BoundedProtocol(proxy.socket, cfg.timeout)
                return client
            except Exception as e:  # socket, TLS or PyKMIP errors: all mean "not reached"
                log.warning("KMIP connection failed", extra={
                    "backend": self.backend, "attempt": attempt + 1,
                    "reason": type(e).__name__})
                if attempt < cfg.retries:
                    time.sleep(delay)
                    delay *= 2
        raise ConnectionLost("cannot connect")

    def _run(self, fn: Callable[[ProxyKmipClient], T], deadline: float) -> T:
        if time.monotonic() >= deadline:
            # picked up by a thread only as its caller gave up (asyncio cancels what is
            # still queued, not what has just started): a Create or Destroy done now
            # would be one the caller was told had failed
            raise ConnectionLost("the call's deadline passed before it started")
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = self._connect(deadline)
        try:
            client.proxy.protocol.deadline = deadline
            result = fn(client)
        except KmipOperationFailure:
            self._idle.put(client)
            raise
        except Exception as e:
            # anything else leaves the TTLV stream in an unknown state: drop it
            _close(client)
            raise ConnectionLost(type(e).__name__) from None
        self._idle.put(client)
        return result

    async def call(self, fn: Callable[[ProxyKmipClient], T], what: str) -> T:
        """Run ``fn(client)`` on a pooled connection within the call deadline."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.cfg.call_deadline
        try:
            async with asyncio.timeout(self.cfg.call_deadline):
                async with self._slots:
                    return await loop.run_in_executor(self._executor, self._run, fn, deadline)
        except KmipOperationFailure as e:
            rv = _REASONS.get(e.reason, ckr.FUNCTION_FAILED)
            log.info("KMIP operation refused", extra={
                "backend": self.backend, "operation": what, "reason": str(e.reason)})
            raise Pkcs11Error(rv, f"KMIP {what}: {e.reason}") from None
        except (ConnectionLost, TimeoutError) as e:
            self.errors += 1
            log.warning("KMIP server unreachable", extra={
                "backend": self.backend, "operation": what, "reason": type(e).__name__})
            raise Pkcs11Error(ckr.DEVICE_ERROR, f"KMIP {what}: server unreachable") from None

    def close(self) -> None:
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                break
        self._executor.shutdown(wait=False, cancel_futures=True)


def _close(client: ProxyKmipClient) -> None:
    try:
        client.close()
    except Exception:  # closing a broken connection may fail too; it is gone either way
        pass



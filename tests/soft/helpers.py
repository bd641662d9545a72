"""Driving a SoftBackend directly (no gateway), for unit tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.config import BackendConfig
from p11gate.errors import Pkcs11Error

SO_PIN, USER_PIN = b"so-secret-77", b"user-pin-4321"


def cid(name: str) -> int:
    return CALLS_BY_NAME[name].id


def soft_config(path: Path, **kw: Any) -> BackendConfig:
    return BackendConfig(name="soft", type="soft", path=str(path), **kw)


class Driver:
    """Synchronous calls into a started SoftBackend on a private event loop."""

    def __init__(self, cfg: BackendConfig) -> None:
        from p11gate.backends.soft.backend import SoftBackend

        self.loop = asyncio.new_event_loop()
        self.backend = SoftBackend(cfg)
        self.loop.run_until_complete(self.backend.start())

    def __call__(self, name: str, *args: Any) -> list[Any]:
        return self.loop.run_until_complete(self.backend.call(cid(name), list(args)))

    def rv(self, name: str, *args: Any) -> int:
        try:
            self(name, *args)
        except Pkcs11Error as e:
            return e.rv
        return 0

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.stop())
        self.loop.close()


def initialised(path: Path) -> Driver:
    """A fresh token with SO and user PINs set; returns a driver with no session open."""
    d = Driver(soft_config(path))
    d("C_InitToken", 1, SO_PIN, b"unit")
    (s,) = d("C_OpenSession", 1, 6)
    d("C_Login", s, 0, SO_PIN)
    d("C_InitPIN", s, USER_PIN)
    d("C_CloseSession", s)
    return d

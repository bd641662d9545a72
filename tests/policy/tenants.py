"""Helpers for tenancy tests: a gateway whose socket other uids can reach, and running
clients (pkcs11-tool, python-pkcs11, raw RPC) as another uid."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient

CKU_SO, CKU_USER = 0, 1
C_GetSlotList, C_GetTokenInfo, C_InitToken, C_OpenSession = 4, 6, 9, 10
C_InitPIN, C_Login, C_Logout = 14, 18, 19
C_CreateObject, C_DestroyObject, C_GetAttributeValue = 20, 22, 24
C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 26, 27, 28
C_SignInit, C_Sign = 42, 43
CKF_RW, CKF_SERIAL = 2, 4


def shared_socket_dir() -> Path:
    """A directory every uid can traverse (pytest's tmp dirs are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="p11gate-tenants-", dir="/tmp"))
    d.chmod(0o755)
    return d


def remove(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def tool_as(uid: int, gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """pkcs11-tool through p11-kit-client.so, run as ``uid``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "P11_KIT_SERVER_ADDRESS": gw.address}
    return subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args], env=env,
                          capture_output=True, text=True, timeout=120, user=uid, group=uid,
                          extra_groups=[], cwd="/tmp")


def _child(uid: int, fn: Callable[..., Any], args: tuple[Any, ...],
           q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        q.put(("ok", fn(*args)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def as_uid(uid: int, fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
    """Run ``fn(*args)`` in a forked child that switched to ``uid``; return its result
    (the gateway sees the child's peer credentials)."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(uid, fn, args, q))
    p.start()
    try:
        status, value = q.get(timeout=timeout)
    finally:
        p.join(10)
    if status != "ok":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


def raw(path: str) -> RawClient:
    c = RawClient(path)
    c.initialize()
    return c


def slot_of(c: RawClient, label: str) -> int:
    (slots,) = c.call(C_GetSlotList, [1, 16])
    for s in slots:
        info = c.call(C_GetTokenInfo, [s])
        if info[0].rstrip(b" ") == label.encode():
            return int(s)
    raise AssertionError(f"no slot for {label}")


def find(c: RawClient, s: int, template: list[Any]) -> list[int]:
    c.call(C_FindObjectsInit, [s, template])
    (found,) = c.call(C_FindObjects, [s, 64])
    c.call(C_FindObjectsFinal, [s])
    return list(found)

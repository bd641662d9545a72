"""Helpers for the limits tests: a gateway started under a given RLIMIT_NOFILE, its
memory, a signing bystander, and a hostile uid holding many connections."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
from tests import gateway_proc
from tests.gateway_proc import Gateway, sign, signer

CKM_ECDSA = 0x1041
C_GenerateRandom, C_CloseSession, C_GetTokenInfo = 64, 11, 6


def config(base: Path, sock: Path, token: dict[str, Any], server_extra: str = "") -> Path:
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sock}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"
{server_extra}

[[backend]]
name = "softhsm"
module = "{token['module']}"
call_timeout = 10.0
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "signing"
backend = "softhsm"
select = {{ label = "{token['label']}" }}
""")
    return cfg


@contextlib.contextmanager
def nofile(soft: int, hard: int) -> Iterator[None]:
    """Processes that tests.gateway_proc starts inside run with this RLIMIT_NOFILE (set
    in the child: this root has no CAP_SYS_RESOURCE to raise its own limit back)."""
    real = subprocess.Popen

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        return real(*args, preexec_fn=limited, **kwargs)

    with mock.patch.object(gateway_proc.subprocess, "Popen", popen):
        yield


def rss(gw: Gateway) -> int:
    """Resident memory of the gateway and its workers, bytes."""
    p = psutil.Process(gw.proc.pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += c.memory_info().rss
    return total



def sign_n(path: str, n: int) -> dict[str, Any]:
    """Connect, log in, sign n times: counts of successes and errors (run as any uid)."""
    ok, errors = 0, []
    try:
        c, sess, key = signer(path)
        for _ in range(n):
            try:
                sign(c, sess, key)
                ok += 1
            except Exception as e:
                errors.append(repr(e))
        c.close()
    except Exception as e:
        errors.append("setup: " + repr(e))
    return {"ok": ok, "errors": errors}


class Bystander(threading.Thread):
    """Signs in a loop on one connection until stopped; every failure is counted."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            c, sess, key = signer(self.path)
        except Exception as e:
            self.errors.append("setup: " + repr(e))
            return
        while not self.stop.is_set():
            try:
                sign(c, sess, key)
                self.ok += 1
            except Exception as e:
                self.errors.append(repr(e))
                return
            time.sleep(0.01)
        c.close()


def _hold(uid: int, path: str, n: int, per_identity_cap: int, q: Any, leave: Any) -> None:
    """As ``uid``: open n idle connections; those beyond the cap must be closed by the
    gateway at once (time to refuse measured); hold the rest until told to leave."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, n + 256))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        socks: list[socket.socket] = []
        refused: list[float] = []
        connect_errors = 0
        for i in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            t0 = time.monotonic()
            try:
                s.connect(path)
            except OSError:
                connect_errors += 1
                s.close()
                continue
            if i >= per_identity_cap:
                try:
                    gone = s.recv(1) == b""
                except (ConnectionResetError, BrokenPipeError):
                    gone = True
                except TimeoutError:
                    gone = False
                if gone:
                    refused.append(time.monotonic() - t0)
            socks.append(s)
        # those within the cap are still open
        still_open = 0
        for s in socks[:per_identity_cap]:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    continue
            except BlockingIOError:
                still_open += 1
                continue
            except OSError:
                continue
        q.put(("ok", {"refused": len(refused), "still_open": still_open,
                      "connect_errors": connect_errors,
                      "refuse_max": max(refused, default=0.0),
                      "refuse_median": sorted(refused)[len(refused) // 2] if refused else 0.0}))
        leave.wait(300)
        for s in socks:
            s.close()
    except BaseException as e:
        q.put(("error", repr(e)))


class Hoarder:
    """A hostile uid holding many idle connections (a forked child)."""

    def __init__(self, uid: int, path: str, n: int, cap: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.q = ctx.Queue()
        self.leave = ctx.Event()
        self.p = ctx.Process(target=_hold, args=(uid, path, n, cap, self.q, self.leave))
        self.p.start()

    def result(self, timeout: float = 120) -> dict[str, Any]:
        status, value = self.q.get(timeout=timeout)
        assert status == "ok", value
        return value  # type: ignore[no-any-return]

    def go(self) -> float:
        """Close every connection; the moment it did."""
        self.leave.set()
        self.p.join(30)
        return time.monotonic()

"""Start a real `p11gate serve` for tests, and a raw RPC client to talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from p11gate.codec import (
    HANDSHAKE,
    V0241,
    Attribute,
    Dialect,
    Mechanism,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    encode_request,
)

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
CKM_ECDSA = 0x1041
#: call ids (p11-kit RPC) the helpers below use
_GET_SLOT_LIST, _OPEN_SESSION, _LOGIN = 4, 10, 18
_FIND_INIT, _FIND, _FIND_FINAL, _SIGN_INIT, _SIGN = 26, 27, 28, 42, 43


def write_config(base: Path, token: dict[str, Any], isolation: str = "process",
                 name: str = "signing", extra_backend: str = "") -> Path:
    """A gateway configuration serving ``token``: a SoftHSM token (tests/softhsm.py) or a
    built-in soft token (tests/soft_token.py, where ``isolation`` does not apply). The
    backend is named "softhsm" either way, so that tests can name it."""
    sock = base / "p11gate.sock"
    cfg = base / "p11gate.toml"
    if token.get("type") == "soft":
        path = token["path"]
        backend = f'type = "soft"\npath = "{path}"\n'
    else:
        module, conf = token["module"], token["conf"]
        backend = (f'module = "{module}"\nisolation = "{isolation}"\n'
                   f'call_timeout = 5.0\nenv = {{ SOFTHSM2_CONF = "{conf}" }}\n')
    cfg.write_text(
        f"""
[server]
listen = "unix:path={sock}"
state_dir = "{base / 'state'}"
log_format = "json"

[[backend]]
name = "softhsm"
{backend}{extra_backend}

[[token]]
name = "{name}"
backend = "softhsm"
select = {{ label = "{token['label']}" }}
"""
    )
    return cfg


class Gateway:
    """A running `p11gate serve --config` subprocess."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config.parent / "p11gate.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p11gate.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=self._log, env=env or dict(os.environ),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "P11_KIT_SERVER_ADDRESS=" not in line:
            self.stop()
            raise RuntimeError(f"gateway did not start: {line!r}\n{self.log()}")
        self.address = line.split("=", 1)[1].split(";", 1)[0]
        self.path = self.address.removeprefix("unix:path=")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records so far (log_format = "json"); other lines are skipped."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": self.address}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class RawClient:
    """A minimal blocking p11-kit RPC client, for sending exactly the bytes a test wants."""

    def __init__(self, path: str | None, version: int = 0, dialect: Dialect = V0241,
                 timeout: float = 10.0, sock: Any = None) -> None:
        """Connect to the unix socket ``path``, or use ``sock`` (e.g. a TLS socket)."""
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        self.sock = sock
        self.sock.settimeout(timeout)
        self.sock.sendall(bytes([version]))
        self.version = self.sock.recv(1)
        self.dialect = dialect
        self.code = 0x10

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The next frame (code, body), or None if the gateway closed the connection."""
        hdr = self._recv(12)
        if hdr is None:
            return None
        code, olen, blen = struct.unpack(">III", hdr)
        rest = self._recv(olen + blen)
        if rest is None:
            return None
        return code, rest[olen:]

    def _recv(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """Send a request; return reply values (raises codec.ReplyError on ERROR)."""
        self.code += 1
        self.sock.sendall(build_frame(self.code, encode_request(call_id, args, self.dialect),
                                      b"client"))
        frame = self.recv_frame()
        if frame is None:
            raise ConnectionError("gateway closed the connection")
        assert frame[0] == self.code
        return decode_reply(frame[1], self.dialect, call_id, args)

    def initialize(self) -> None:
        self.call(1, [HANDSHAKE, 0, b"\0"])

    def find(self, session: int, template: list[Any], max_count: int = 64) -> list[int]:
        """C_FindObjectsInit, one C_FindObjects, C_FindObjectsFinal: the handles."""
        self.call(26, [session, template])
        (found,) = self.call(27, [session, max_count])
        self.call(28, [session])
        return list(found)

    def close(self) -> None:
        self.sock.close()


def rv_of(c: RawClient, call_id: int, args: list[Any]) -> int:
    """The CK_RV of one call (CKR_OK when it succeeds)."""
    try:
        c.call(call_id, args)
    except ReplyError as e:
        return e.rv
    return 0


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def is_worker(cmdline: list[str]) -> bool:
    """A `p11gate worker` process. Matched on the argument vector, not on a substring:
    a child between fork and exec still carries the gateway's command line, whose
    config path can contain the word (pytest names directories after the test)."""
    return cmdline[1:4] == ["-m", "p11gate.cli", "worker"]


def worker_pids(gw: Gateway) -> list[int]:
    """Live worker processes of the gateway (dead ones not yet reaped are not counted)."""
    out = []
    for p in psutil.Process(gw.proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and is_worker(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def signer(path: str, pin: str = "1234") -> tuple[RawClient, int, int]:
    """A logged-in raw client with a read/write session and the EC key (CKA_ID 01)."""
    c = RawClient(path)
    c.initialize()
    (slots,) = c.call(_GET_SLOT_LIST, [1, 8])
    (sess,) = c.call(_OPEN_SESSION, [slots[0], 6])  # CKF_SERIAL_SESSION | CKF_RW_SESSION
    try:
        c.call(_LOGIN, [sess, 1, pin.encode()])
    except ReplyError as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    c.call(_FIND_INIT, [sess, [Attribute(0, 3, 8), Attribute(0x102, b"\x01", 1)]])
    (found,) = c.call(_FIND, [sess, 4])
    c.call(_FIND_FINAL, [sess])
    assert len(found) == 1
    return c, sess, found[0]


def sign(c: RawClient, sess: int, key: int) -> None:
    """One ECDSA signature of a 32-byte digest."""
    c.call(_SIGN_INIT, [sess, Mechanism(CKM_ECDSA, None), key])
    (sig,) = c.call(_SIGN, [sess, b"\x07" * 32, 64])
    assert isinstance(sig, bytes) and len(sig) == 64

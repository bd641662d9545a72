"""`check-config` loads each configured module: in a throw-away `p11gate worker`
process, started as the gateway starts it (the backend's command and environment),
which must answer C_Initialize and C_GetInfo. A module that cannot be loaded is
reported in the loader's own words (the worker's stderr: dlopen's error, a missing
C_GetFunctionList); one that works, by its manufacturer and library version. Vendor
code never runs in the checking process itself: it may crash or hang."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
from dataclasses import dataclass
from typing import Any

from .backends.worker_env import worker_environment
from .codec import HANDSHAKE, ReplyError, build_frame, ckr, decode_reply, encode_request
from .codec import dialect_for_version as _dialect
from .config import BackendConfig

#: seconds a module may take to load, initialize and answer (SoftHSM: well under 1)
PROBE_TIMEOUT = 30.0
C_INITIALIZE, C_FINALIZE, C_GETINFO = 1, 2, 3
_PREFIX = re.compile(r"^p11gate worker\[\d+\]: ")


@dataclass
class Probe:
    backend: str
    module: str
    #: manufacturer, library description and versions when it loaded; else None
    info: dict[str, str] | None = None
    error: str | None = None


def command(cfg: BackendConfig) -> list[str]:
    """The worker command of ``cfg``, as the gateway would start it."""
    from .backends.worker_process import WorkerBackend

    return WorkerBackend(cfg).command()


def probe(cfg: BackendConfig, timeout: float = PROBE_TIMEOUT) -> Probe:
    out = Probe(cfg.name, cfg.module)
    parent, child = socket.socketpair()
    try:
        proc = subprocess.Popen(command(cfg), stdin=child.fileno(), stdout=child.fileno(),
                                stderr=subprocess.PIPE, env=worker_environment(cfg.env),
                                start_new_session=True)
    except OSError as e:
        parent.close()
        child.close()
        out.error = f"cannot start the worker {command(cfg)[0]}: {e.strerror or e}"
        return out
    child.close()
    try:
        parent.settimeout(timeout)
        out.info = _ask(parent)
    except (OSError, EOFError, ReplyError) as e:
        reason = _reason(e)
        out.error = reason
    finally:
        parent.close()  # the worker finalizes and exits at the end of its stream
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if out.error is not None:
        words = [_PREFIX.sub("", line) for line in err.decode(errors="replace").splitlines()
                 if line.strip()]
        if words:  # the loader's own words beat "connection closed"
            out.error = "; ".join(words[-3:])
        elif proc.returncode not in (0, None):
            out.error += f" (worker exit status {proc.returncode})"
    return out


def _reason(e: Exception) -> str:
    if isinstance(e, ReplyError):
        return f"the module answered {ckr.name(e.rv)}"
    if isinstance(e, TimeoutError):
        return "no answer from the module in time (it hangs at load or C_Initialize)"
    if isinstance(e, EOFError):
        return "the worker exited before answering"
    return str(e)


def _ask(sock: socket.socket) -> dict[str, str]:
    dialect = _dialect(0)
    sock.sendall(b"\x00")
    if not _recv(sock, 1):
        raise EOFError
    code = [0]

    def call(call_id: int, args: list[Any]) -> list[Any]:
        code[0] += 1
        sock.sendall(build_frame(code[0], encode_request(call_id, args, dialect), b""))
        hdr = _recv(sock, 12)
        _, olen, blen = struct.unpack(">III", hdr)
        body = _recv(sock, olen + blen)[olen:]
        return decode_reply(body, dialect, call_id, args)

    call(C_INITIALIZE, [HANDSHAKE, 0, b"\0"])
    cryptoki, manufacturer, _flags, description, library = call(C_GETINFO, [])
    with contextlib.suppress(OSError, EOFError, ReplyError):
        call(C_FINALIZE, [])
    return {"manufacturer": _text(manufacturer), "description": _text(description),
            "library_version": _version(library), "cryptoki_version": _version(cryptoki)}


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _text(v: Any) -> str:
    raw = v if isinstance(v, bytes) else str(v).encode()
    # module-chosen bytes: printable ASCII only, so a report line cannot be forged
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in raw.rstrip(b" \0"))


def _version(v: Any) -> str:
    if isinstance(v, tuple | list) and len(v) == 2:
        return f"{v[0]}.{v[1]}"
    major, minor = getattr(v, "major", None), getattr(v, "minor", None)
    if major is not None:
        return f"{major}.{minor}"
    return str(v)


def report(backends: list[BackendConfig], source: str) -> tuple[list[str], list[str]]:
    """(lines for stdout, errors) for every backend, all probed in one run."""
    lines, errors = [], []
    for i, b in enumerate(backends):
        if b.type == "soft":
            lines.append(f"soft token {b.name}: {b.path}")
            continue
        if b.kmip is not None:  # not contacted here: a server down is a runtime matter
            lines.append(f"KMIP token {b.name}: {b.kmip.describe()}")
            continue
        p = probe(b)
        if p.info is not None:
            lines.append(f"module {b.name}: {b.module}: loaded: {p.info['manufacturer']} "
                         f"{p.info['description']!r}, library {p.info['library_version']}, "
                         f"cryptoki {p.info['cryptoki_version']}")
        else:
            errors.append(f"{source}: backend[{i}] ({b.name}).module: {b.module}: cannot "
                          f"be loaded: {p.error}")
    return lines, errors

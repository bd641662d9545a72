"""systemd integration without a systemd library: sd_notify(3) and sd_listen_fds(3).

* ``notify`` sends a state ("READY=1", "STOPPING=1", …) as one datagram to the socket
  ``NOTIFY_SOCKET`` names (a path, or ``@name`` in the abstract namespace). Without the
  variable -- not started by systemd as ``Type=notify`` -- it does nothing.
* ``inherited_sockets`` takes the listening sockets systemd passed (``LISTEN_FDS`` fds from
  3 on, meant for this process when ``LISTEN_PID`` is our pid, named by
  ``LISTEN_FDNAMES``) and removes the variables, so that no child (a worker) believes the
  sockets are its own. The fds are made close-on-exec for the same reason.

The gateway matches each inherited socket to a ``[server] listen`` address by the address
it is bound to (``Inherited.take_unix`` / ``take_tcp``); a socket that matches none is an
error the operator must fix (a unit and a configuration that disagree), never served
blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import ipaddress
import logging
import os
import socket
import stat
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("p11gate")

#: sd_listen_fds(3): the first passed file descriptor
LISTEN_FDS_START = 3


def notify(*states: str) -> bool:
    """Send ``states`` (joined by newlines) to systemd; True when sent."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall("\n".join(states).encode())
        return True
    except OSError as e:
        # readiness that cannot be told is worth a line, never a crash
        log.warning("cannot notify systemd", extra={"notify_socket": addr,
                                                    "error": e.strerror or str(e)})
        return False


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp systemd (Type=notify-reload) expects."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def start_watchdog() -> asyncio.Task[None] | None:
    """With ``WatchdogSec=`` (WATCHDOG_USEC for our pid), tell systemd twice per period
    that the event loop still runs; a loop stuck that long gets the service restarted."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None

    async def ping() -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    return asyncio.get_running_loop().create_task(ping())


@dataclass
class InheritedSocket:
    sock: socket.socket
    name: str

    def describe(self) -> str:
        try:
            where = self.sock.getsockname()
        except OSError:
            where = "?"
        return f"fd {self.sock.fileno()} ({self.name or 'unnamed'}, bound to {where!r})"


@dataclass
class Inherited:
    """The sockets systemd passed that no listener has claimed yet."""

    sockets: list[InheritedSocket] = field(default_factory=list)

    def take_unix(self, path: str) -> socket.socket | None:
        """The inherited unix stream socket bound to ``path``, if any."""
        for s in self.sockets:
            if s.sock.family == socket.AF_UNIX and _unix_name(s.sock) == os.path.normpath(path):
                self.sockets.remove(s)
                return s.sock
        return None

    def take_tcp(self, host: str, port: int) -> list[socket.socket]:
        """The inherited TCP sockets for ``host:port``: bound to that port and to one of
        the host's addresses (any address when the host is a wildcard, or when the socket
        is bound to the wildcard address)."""
        wanted = _addresses_of(host)
        out = []
        for s in list(self.sockets):
            if s.sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip, bound_port = s.sock.getsockname()[:2]
            if bound_port != port:
                continue
            if wanted is None or _is_wildcard(ip) or _ip(ip) in wanted:
                self.sockets.remove(s)
                out.append(s.sock)
        return out

    def leftovers(self) -> list[str]:
        return [s.describe() for s in self.sockets]


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> Inherited:
    """Claim the sockets systemd passed to this process (and clear the variables)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(k, None)
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        return Inherited()
    if pid != os.getpid() or count <= 0:
        return Inherited()
    out = Inherited()
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(f"fd {fd} is not a socket")
            sock = socket.socket(fileno=fd)
        except OSError as e:
            log.error("ignoring a file descriptor passed by systemd",
                      extra={"fd": fd, "error": str(e)})
            continue
        out.sockets.append(InheritedSocket(sock, names[i] if i < len(names) else ""))
    return out


def keep_socket_file(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """Arguments for ``create_unix_server`` that leave the socket file alone when the
    server closes (Python >= 3.13 removes it by default): an inherited socket belongs to
    systemd's socket unit, which goes on listening on it while the service is stopped."""
    try:
        params = inspect.signature(loop.create_unix_server).parameters
    except (TypeError, ValueError):
        return {}
    return {"cleanup_socket": False} if "cleanup_socket" in params else {}


def _unix_name(sock: socket.socket) -> str | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if isinstance(name, bytes):  # the abstract namespace
        return None
    return os.path.normpath(name) if name else None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    with contextlib.suppress(ValueError):
        addr = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return addr
    return None


def _is_wildcard(text: str) -> bool:
    addr = _ip(text)
    return addr is not None and addr.is_unspecified


def _addresses_of(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses ``host`` stands for; None for the wildcard (any address)."""
    if not host or _is_wildcard(host.strip("[]")):
        return None
    literal = _ip(host.strip("[]"))
    if literal is not None:
        return {literal}
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {a for a in (_ip(str(i[4][0])) for i in infos) if a is not None}

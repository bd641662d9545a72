"""Unix listening sockets that never take over, or delete, another live gateway's socket.

``bind_unix`` binds the path itself instead of letting the event loop do it (asyncio and
uvloop both unlink any existing socket file first, which silently steals the address of a
gateway that is still running). A path that is taken is probed: if a process answers, we
refuse and name it (its pid from SO_PEERCRED of the probe connection); if nobody answers,
the file is the leftover of a dead process and is replaced. Only a socket file, never
another kind of file, is removed.

``BoundSocket.unlink`` removes the file only while it is still the one this process
created (same device and inode), so a gateway that stops (or a second start that was
refused) never deletes a socket that someone else created at that path since.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass


class SocketInUse(Exception):
    """The path is held by a live process; the message is meant for the operator."""


@dataclass
class BoundSocket:
    sock: socket.socket
    path: str
    dev: int
    ino: int

    def is_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def unlink(self) -> None:
        if self.is_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def holder_of(path: str) -> int | None:
    """The pid of the process listening on ``path`` (0 when it answers but its pid is
    unknown), or None when nobody listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return None
    except OSError as e:
        if e.errno in (errno.ENOENT,):
            return None
        return 0  # EAGAIN (a full backlog), EACCES, a timeout …: someone may be there
    else:
        try:
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = int(struct.unpack("3i", creds)[0])
            return pid if pid > 0 else 0
        except OSError:
            return 0
    finally:
        s.close()


def describe_pid(pid: int) -> str:
    """``pid 123 (p11gate serve --config …)`` for messages; the command line if readable."""
    if pid <= 0:
        return "an unknown process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    cmd = " ".join(argv)
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def bind_unix(path: str, mode: int, what: str = "socket") -> BoundSocket:
    """Bind a stream socket at ``path`` with permissions ``mode`` (not yet listening).

    Raises SocketInUse when a live process answers there or the path is not a socket,
    OSError for other failures (no permission, no such directory, …).
    """
    for attempt in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # the file is created owner-only and opened up afterwards: never more open
        # than asked, not even for an instant
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or attempt:
                raise
            _make_room(path, what)
            continue
        finally:
            os.umask(old)
        try:
            os.chmod(path, mode)
            st = os.lstat(path)
        except OSError:
            sock.close()
            raise
        return BoundSocket(sock, path, st.st_dev, st.st_ino)
    raise AssertionError("unreachable")


def _make_room(path: str, what: str) -> None:
    """Remove a stale socket file at ``path``, or raise SocketInUse."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{what} {path} exists and is not a socket; remove it or choose "
                          "another path")
    pid = holder_of(path)
    if pid is not None:
        raise SocketInUse(f"{what} {path} is in use by {describe_pid(pid)}: another gateway "
                          "is serving there; stop it first or choose another path")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # the socket of a process that died without cleaning up


def make_socket_dir(path: str) -> None:
    """Create the socket's directory when missing, traversable by clients (0755; the
    daemon's umask would make it 0700 and shut out every other user)."""
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)

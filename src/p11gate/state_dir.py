"""The state directory: one gateway at a time, readable by its owner only.

The registry holds every tenant's key labels, owners and mapped-PIN hashes, so the
directory is 0700 and every file in it 0600. ``serve`` sets its umask to 0o077 so that
whatever it (or SQLite, or a worker) creates there is private from the start, and
tightens a directory left too open by an older version or a careless copy.

An exclusive, non-blocking ``flock`` on ``<state_dir>/lock`` (which holds the pid of
its owner) keeps a second gateway from sharing the registry and audit log. The kernel
drops the lock when the process dies, however it dies, so a stale lock file never
blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat

from .unix_socket import describe_pid

log = logging.getLogger("p11gate.state")

LOCK_NAME = "lock"
#: the umask of the daemon: files 0600, directories 0700 unless chmod'ed on purpose
DAEMON_UMASK = 0o077


class StateDirInUse(Exception):
    """Another process holds the state directory; the message is meant for the operator."""


class StateLock:
    """Held for the life of the process (the file descriptor is never inherited)."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_NAME)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # no O_TRUNC: a refused start must not erase the pid of the holder
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(self._fd)
            os.close(self._fd)
            raise StateDirInUse(
                f"state directory {state_dir} is in use by "
                f"{describe_pid(holder) if holder else 'another process'} (lock {self.path}); "
                "stop that gateway first or give this one another [server] state_dir"
            ) from None
        except OSError:
            os.close(self._fd)
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


def tighten(state_dir: str) -> list[str]:
    """Make the state directory 0700 and every file in it 0600 (subdirectories 0700);
    returns what was changed ("path: 0755 -> 0700"). Sockets and symlinks are left as
    they are (their creators set them), and so are files of other users; files that
    cannot be changed are reported. A shared sticky directory (state_dir = "/tmp") is
    never walked: its other files are not ours to change."""
    changed: list[str] = []
    me = os.geteuid()

    def fix(path: str, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return
        if st.st_uid != me:
            changed.append(f"{path}: {mode:04o}, owned by uid {st.st_uid}: not changed")
            return
        new = mode & 0o700
        try:
            os.chmod(path, new)
            changed.append(f"{path}: {mode:04o} -> {new:04o}")
        except OSError as e:
            changed.append(f"{path}: {mode:04o}, cannot change it ({e.strerror})")

    try:
        top = os.lstat(state_dir)
    except FileNotFoundError:
        return changed
    if top.st_mode & stat.S_ISVTX:
        return [f"{state_dir}: a shared directory (sticky bit): not changed; give "
                "[server] state_dir a directory of its own"]
    fix(state_dir, top)
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                fix(p, st)
    return changed


def tighten_and_warn(state_dir: str) -> None:
    """Tighten the state directory's permissions, logging a warning for what changed."""
    changed = tighten(state_dir)
    if changed:
        log.warning("state directory was open to other users; permissions tightened "
                    "(it holds key labels, owners and PIN hashes)",
                    extra={"state_dir": state_dir, "changed": changed[:20],
                           "count": len(changed)})

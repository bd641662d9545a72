"""Compiling one shipped C file into a private cache: the native executor's shared library
(executor.py) and the bench's load generators (bench/cli.py) are built here alike.

What lands in the cache is later loaded into the gateway or run as this user, so a cache
another user could write to would let them run their code as this one: the directory is
created 0700, and is used, like a file already in it, only when this user owns it,
nobody else can write it and it is not a symbolic link. The compiler gets only PATH and
TMPDIR from the environment, so variables that steer it (include and library paths,
GCC_EXEC_PREFIX, …) cannot smuggle other code into what gets loaded. Each file is named
by its caller after a hash of its source, so a changed source builds a new file, and is
moved into place atomically, so a concurrent run never uses a half-written one.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BuildError", "CompileFailed", "NoCompiler", "build", "private"]


class BuildError(Exception):
    """The file cannot be built or used from the cache; the message says why."""


class NoCompiler(BuildError):
    """No C compiler: neither $CC, ``cc`` nor ``gcc``."""


class CompileFailed(BuildError):
    """The compiler refused the file; ``stderr`` is what it said."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def private(path: Path) -> None:
    """Refuse a directory or file another user could have written: loading or running it
    would run their code as this user."""
    st = path.lstat()
    if st.st_uid != os.geteuid():
        raise BuildError(f"{path} is owned by uid {st.st_uid}, not this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(f"{path} is writable by others")
    if stat.S_ISLNK(st.st_mode):
        raise BuildError(f"{path} is a symbolic link")


def build(src: bytes, cache: Path, name: str, stem: str, flags: Sequence[str],
          libs: Sequence[str] = ()) -> Path:
    """``cache/name``, compiled from ``src`` unless it is there already: ``cc flags -o OUT
    {stem}.c libs`` in a temporary directory inside ``cache``. Raises BuildError
    (NoCompiler, CompileFailed) and, from the compile step, OSError."""
    target = cache / name
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        private(cache)
        if target.exists():
            private(target)
            return target
    except OSError as e:
        raise BuildError(f"cache directory {cache}: {e}") from None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NoCompiler("no C compiler")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        c = Path(tmp) / f"{stem}.c"
        c.write_bytes(src)
        out = Path(tmp) / f"{stem}{Path(name).suffix}"
        r = subprocess.run([cc, *flags, "-o", str(out), str(c), *libs], capture_output=True,
                           text=True,
                           env={k: v for k, v in os.environ.items() if k in ("PATH", "TMPDIR")})
        if r.returncode != 0:
            raise CompileFailed(r.stderr)
        # not group or other writable whatever the umask: private() accepts it next time
        os.chmod(out, 0o755)
        os.replace(out, target)
    return target

"""The native call executor (``executor.c``): module threads that hold no GIL.

In-process (``isolation = "none"``), a call used to cross from the event loop to a
Python module thread and back; each crossing passes the GIL, and on a 2-core machine
those hand-offs were about half of a C_GenerateRandom's CPU. With this executor the loop
marshals the arguments itself (:meth:`NativeModule.begin`), hands the C function and its
argument words to a POSIX thread that calls it without the interpreter, and finishes
the reply when the thread's CK_RV comes back through a pipe (:meth:`NativeModule.finish`).

The C file ships in the package and is compiled on first use, like the bench's load
generator, into a private cache directory: ``P11GATE_CACHE_DIR``, else systemd's
``CACHE_DIRECTORY``, else ``$XDG_CACHE_HOME/p11gate``, else ``~/.cache/p11gate``. It is
created 0700, and a library is only loaded from a directory owned by this user that
nobody else can write, and only if the file is this user's too. Without a C compiler,
or on an ABI other than LP64 x86_64/aarch64, :func:`load` raises
:class:`ExecutorUnavailable` and the back end keeps Python threads (``executor =
"auto"``, the default) or refuses to start (``executor = "native"``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .build import BuildError, CompileFailed, NoCompiler, build
from .cdef import ffi

__all__ = ["ExecutorUnavailable", "NativeExecutor", "arg_kinds", "cache_dir", "load"]

ffi.cdef("""
typedef struct p11x p11x;
int p11x_abi(void);
int p11x_max_args(void);
p11x *p11x_new(int nthreads, uint32_t njobs);
int64_t p11x_submit(p11x *x, uintptr_t fn, int nargs, const uintptr_t *args, uint64_t tag);
int p11x_cancel(p11x *x, uint32_t i, uint64_t tag);
int p11x_take(p11x *x, uint64_t *tags, unsigned long *rvs, int max);
int p11x_bell_fd(p11x *x);
int p11x_busy(p11x *x);
int p11x_stop(p11x *x);
int p11x_free(p11x *x);
""")

_ABI = 1
#: one word per argument: CK_ULONG and pointers only (see executor.c)
WORD, POINTER = 0, 1
_TAKE = 256
#: the 64-bit LP64 ABIs where CK_ULONG and pointers travel alike
_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})

_lib: Any = None


class ExecutorUnavailable(Exception):
    """The native executor cannot be used here; the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("P11GATE_CACHE_DIR")
    if base:
        return Path(base)
    systemd = os.environ.get("CACHE_DIRECTORY")  # the unit's CacheDirectory=
    if systemd:
        return Path(systemd.split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p11gate"


def _build(src: bytes) -> Path:
    name = f"p11gate-executor-{hashlib.sha256(src).hexdigest()[:16]}.so"
    try:
        return build(src, cache_dir(), name, "executor", ["-O2", "-shared", "-fPIC", "-pthread"])
    except NoCompiler:
        raise ExecutorUnavailable("no C compiler (cc) to build it: apt-get install gcc") from None
    except CompileFailed as e:
        raise ExecutorUnavailable(f"building it failed: {e.stderr.strip()[:500]}") from None
    except BuildError as e:  # the cache is not private (see build.private)
        raise ExecutorUnavailable(str(e)) from None


def load() -> Any:
    """The compiled executor library (built on first use); raises ExecutorUnavailable."""
    global _lib
    if _lib is not None:
        return _lib
    if platform.machine().lower() not in _MACHINES or ffi.sizeof("CK_ULONG") != 8 \
            or ffi.sizeof("void *") != 8:
        raise ExecutorUnavailable(f"not an LP64 x86_64/aarch64 system ({platform.machine()})")
    src = resources.files("p11gate.backends.native").joinpath("executor.c").read_bytes()
    path = _build(src)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        raise ExecutorUnavailable(f"cannot load {path}: {e}") from None
    if lib.p11x_abi() != _ABI:
        raise ExecutorUnavailable(f"{path}: ABI {lib.p11x_abi()}, expected {_ABI}")
    _lib = lib
    return lib


def arg_kinds(fn: Any) -> tuple[int, ...] | None:
    """How each parameter of C function ``fn`` travels (WORD or POINTER), or None when
    one is neither an 8-byte integer nor a pointer (the call then stays on a Python
    thread: C_GetSlotList's CK_BBOOL is the one such parameter)."""
    if fn is None:
        return None
    t = ffi.typeof(fn)
    kinds: list[int] = []
    for a in t.args:
        if a.kind in ("pointer", "function"):  # a function pointer: C_OpenSession's Notify
            kinds.append(POINTER)
        elif a.kind == "primitive" and a.cname == "unsigned long":  # CK_ULONG and kin
            kinds.append(WORD)
        else:
            return None
    if len(kinds) > 12 or t.ellipsis:
        return None
    return tuple(kinds)


class NativeExecutor:
    """A pool of native threads that make PKCS#11 calls (see executor.c)."""

    def __init__(self, threads: int, capacity: int = 4096) -> None:
        self._lib = lib = load()
        self._x = lib.p11x_new(threads, capacity)
        if self._x == ffi.NULL:
            raise ExecutorUnavailable(f"could not start {threads} native threads")
        self.threads = threads
        self.bell_fd: int = lib.p11x_bell_fd(self._x)
        self._words = ffi.new("uintptr_t[12]")
        self._pointers = ffi.cast("void **", self._words)
        self._tags = ffi.new(f"uint64_t[{_TAKE}]")
        self._rvs = ffi.new(f"unsigned long[{_TAKE}]")
        self._next_tag = itertools.count(1).__next__
        self.freed = False
        #: bells read by the loop (one per wake-up; fewer than calls under load)
        self.bells = 0

    def submit(self, fn_address: int, kinds: Sequence[int], cargs: Sequence[Any],
               keep: list[Any]) -> tuple[int, int]:
        """Queue ``fn(*cargs)``. Returns (job index, tag); index -1: the job table is
        full (try again after :meth:`take`), -2: stopping. ``keep`` receives the
        buffers made here, which must outlive the call. Raises TypeError or
        OverflowError for a value that does not fit its parameter, as cffi would."""
        if len(cargs) != len(kinds):
            raise TypeError(f"{len(cargs)} arguments for {len(kinds)} parameters")
        words, pointers = self._words, self._pointers
        for i, kind in enumerate(kinds):
            v = cargs[i]
            if kind == WORD:
                if not isinstance(v, int) or not 0 <= v < 1 << 64:
                    raise OverflowError(f"argument {i}: {v!r} is not a CK_ULONG")
                words[i] = v
            elif v.__class__ is bytes:
                b = ffi.from_buffer(v)
                keep.append(b)
                pointers[i] = b
            elif v is None:
                pointers[i] = ffi.NULL
            else:
                pointers[i] = v  # a cdata pointer or array; anything else: TypeError
        tag = self._next_tag()
        return self._lib.p11x_submit(self._x, fn_address, len(kinds), words, tag), tag

    def cancel(self, index: int, tag: int) -> bool:
        """True when the job had not started (it never will)."""
        return bool(self._lib.p11x_cancel(self._x, index, tag))

    def take(self) -> list[tuple[int, int]]:
        """Finished jobs: (tag, CK_RV). Read the bell pipe first."""
        out: list[tuple[int, int]] = []
        lib, x, tags, rvs = self._lib, self._x, self._tags, self._rvs
        while True:
            n = lib.p11x_take(x, tags, rvs, _TAKE)
            out.extend((tags[i], rvs[i]) for i in range(n))
            if n < _TAKE:
                return out

    def busy(self) -> int:
        return int(self._lib.p11x_busy(self._x))

    def stop(self) -> int:
        """Ask the threads to end once their queue is empty; how many are still alive."""
        return int(self._lib.p11x_stop(self._x))

    def free(self) -> bool:
        """Join and free, once every thread has ended; False (and nothing freed) while
        one is still inside the module."""
        if self.freed:
            return True
        if self._lib.p11x_free(self._x) != 0:
            return False
        self.freed = True
        return True

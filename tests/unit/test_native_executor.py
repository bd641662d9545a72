"""The native call executor (backends/native/executor.c) behind the in-process back end:
the same results and errors as Python module threads, against real SoftHSMv2; hostile
argument values; a full job table; deadlines; stop with a call hung in the module; and
a cache directory that someone else could write to."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends.inprocess import InProcessBackend
from p11gate.backends.native import executor as native_executor
from p11gate.backends.native.executor import POINTER, WORD
from p11gate.codec import ckr
from p11gate.codec.values import Attribute, AttrRequest, Mechanism
from p11gate.errors import BackendUnavailable, Pkcs11Error

pytestmark = requires_softhsm

C_GetSlotList, C_OpenSession, C_Login, C_GetAttributeValue = 4, 10, 18, 24
C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 26, 27, 28
C_SignInit, C_Sign, C_GenerateKeyPair, C_GenerateRandom = 42, 43, 59, 64
CKA_CLASS, CKA_ID, CKA_LABEL, CKA_KEY_TYPE = 0x0, 0x102, 0x3, 0x100
CKO_PRIVATE_KEY, CKM_ECDSA = 3, 0x1041


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    t = make_token(tmp_path_factory.mktemp("softhsm"))
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = t["conf"]
    yield t
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


async def _backend(token: dict[str, Any], executor: str, **kw: Any) -> InProcessBackend:
    b = InProcessBackend("soft", token["module"], executor=executor, **kw)
    await b.start()
    assert b.describe()["executor"] == executor, b.executor_note
    return b


async def _session(b: InProcessBackend, token: dict[str, Any]) -> int:
    (slots,) = await b.call(C_GetSlotList, [1, 8])
    (session,) = await b.call(C_OpenSession, [slots[0], 6])
    try:
        await b.call(C_Login, [session, 1, token["pin"].encode()])
    except Pkcs11Error as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    return int(session)


async def _rv(fut: Any) -> int:
    try:
        await fut
    except Pkcs11Error as e:
        return e.rv
    return ckr.OK


def test_same_results_and_errors_as_python_threads(token: dict[str, Any]) -> None:
    """A find, an ECDSA signature checked by the key's own CKA_EC_POINT size, attribute
    reads (one sensitive, one unknown type) and hostile values: the native executor
    answers exactly as the Python module threads do."""

    async def script(executor: str) -> list[Any]:
        b = await _backend(token, executor)
        try:
            s = await _session(b, token)
            out: list[Any] = []
            await b.call(C_FindObjectsInit, [s, [Attribute(CKA_CLASS, CKO_PRIVATE_KEY, 8),
                                                 Attribute(CKA_ID, b"\x01", 1)]])
            (found,) = await b.call(C_FindObjects, [s, 10])
            await b.call(C_FindObjectsFinal, [s])
            out.append(len(found))
            key = found[0]
            await b.call(C_SignInit, [s, Mechanism(CKM_ECDSA), key])
            (sig,) = await b.call(C_Sign, [s, b"\x11" * 32, 256])
            out.append(len(sig))  # P-256: r || s
            attrs, rv = await b.call(C_GetAttributeValue, [
                s, key, [AttrRequest(CKA_LABEL, 64), AttrRequest(CKA_KEY_TYPE, 8),
                         AttrRequest(0x11, 64), AttrRequest(0x7FFF_0001, 8)]])
            out.append((rv, [(a.type, a.value) for a in attrs]))
            hostile: list[list[Any]] = [
                [s, "32"],            # a string for a length
                [s, 1 << 70],         # a length no CK_ULONG holds
                [1 << 64, 16],        # a session handle no CK_ULONG holds
                [s],                  # too few arguments
                [s, 16, 16],          # too many
                [-1, 16],             # negative handle
                [s, None],
            ]
            out.extend([await _rv(b.submit(C_GenerateRandom, a)) for a in hostile])
            out.append(await _rv(b.submit(C_Sign, [s, b"x", 64])))  # not initialized
            out.append(await _rv(b.submit(C_Sign, [s, bytearray(b"x"), 64])))
            return out
        finally:
            await b.stop()

    threads = asyncio.run(script("threads"))
    native = asyncio.run(script("native"))
    assert native == threads
    assert threads[0] == 1 and threads[1] == 64
    assert ckr.ARGUMENTS_BAD in threads[3:]


def test_more_calls_than_job_slots_all_answered(token: dict[str, Any]) -> None:
    """A job table of 4 slots and 500 calls at once: the rest wait in the back end and
    go out as slots free up; every call is answered, with its own length."""

    async def main() -> None:
        b = await _backend(token, "native", threads=2, native_capacity=4)
        try:
            s = await _session(b, token)
            results = await asyncio.wait_for(asyncio.gather(
                *(b.submit(C_GenerateRandom, [s, 1 + i % 37]) for i in range(500))), 60)
            assert [len(r[0]) for r in results] == [1 + i % 37 for i in range(500)]
            assert not b._overflow and not b._native_jobs
        finally:
            await b.stop()

    asyncio.run(main())


def test_bell_coalesced_under_bursts(token: dict[str, Any]) -> None:
    async def main() -> None:
        b = await _backend(token, "native", threads=4)
        try:
            s = await _session(b, token)
            assert b._native is not None
            before = b._native.bells
            for _ in range(3):
                results = await asyncio.wait_for(asyncio.gather(
                    *(b.submit(C_GenerateRandom, [s, 16]) for _ in range(2000))), 60)
                assert all(len(r[0]) == 16 for r in results)
            bells = b._native.bells - before
            assert 0 < bells < 6000  # fewer wake-ups than replies
            (one,) = await asyncio.wait_for(b.call(C_GenerateRandom, [s, 4]), 10)
            assert len(one) == 4  # a lone call still wakes the loop by itself
        finally:
            await b.stop()

    asyncio.run(main())


def _slow_keygen(session: int) -> list[Any]:
    pub = [Attribute(0x121, 4096, 8), Attribute(0x1, 0, 1)]  # MODULUS_BITS, TOKEN=false
    return [session, Mechanism(0x0), pub, [Attribute(0x1, 0, 1)]]


def _usleep_address() -> int:
    """libc's usleep: a C function that blocks for as long as it is told, to stand in
    for a module call that hangs."""
    f = cffi.FFI()
    f.cdef("int usleep(unsigned int usec);")
    libc = f.dlopen(None)
    return int(f.cast("uintptr_t", libc.usleep))


def test_stop_with_a_call_hung_in_the_module(token: dict[str, Any]) -> None:
    """A call past its deadline is still inside the module when the back end stops:
    stop returns within its bound, the executor is left alive (never freed under a
    running thread), and when the call returns, nothing crashes and it can be freed."""

    async def main() -> None:
        b = await _backend(token, "native", threads=1, call_timeout=0.05)
        assert b._native is not None
        # C_GenerateRandom's three words go to usleep(first word): a 3 s "module call"
        b._native_calls[C_GenerateRandom] = (_usleep_address(), (WORD, POINTER, WORD))
        hung = b.submit(C_GenerateRandom, [3_000_000, 16])
        with pytest.raises(BackendUnavailable, match="deadline"):
            await hung
        assert b.describe()["hung_calls"] == 1 and not b.up
        native, module = b._native, b._module
        assert native.busy() == 1 and module is not None
        t0 = time.monotonic()
        await b.stop()
        assert time.monotonic() - t0 < 2.8
        assert not native.freed and b._native is native  # left alive, not freed
        deadline = time.monotonic() + 10
        while native.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert native.busy() == 0 and native.stop() == 0
        assert native.free()  # the thread ended: now it can go
        # stop did not finalize under the hung call; do it now, or SoftHSM would stay
        # initialized (with this test's token) for the rest of this process
        assert module.initialized
        module.finalize()

    asyncio.run(main())


def test_stop_under_a_running_call_answers_it_and_does_not_finalize(
        token: dict[str, Any]) -> None:
    """A call still inside the module (before its deadline) when the back end stops:
    its caller gets BackendUnavailable at once instead of waiting forever, and the module
    is not finalized under it."""

    async def main() -> None:
        b = await _backend(token, "native", threads=1, call_timeout=30.0)
        assert b._native is not None
        b._native_calls[C_GenerateRandom] = (_usleep_address(), (WORD, POINTER, WORD))
        running = b.submit(C_GenerateRandom, [3_000_000, 16])
        await asyncio.sleep(0.1)
        native, module = b._native, b._module
        assert native.busy() == 1 and module is not None
        await b.stop()
        with pytest.raises(BackendUnavailable, match="stopped while the call"):
            await asyncio.wait_for(running, 1)
        assert module.initialized  # not finalized under the running call
        deadline = time.monotonic() + 10
        while native.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert native.stop() == 0 and native.free()
        module.finalize()

    asyncio.run(main())


def test_executor_never_frees_under_a_running_thread() -> None:
    native_executor.load()
    x = native_executor.NativeExecutor(1, 4)
    index, tag = x.submit(_usleep_address(), (WORD,), [300_000], [])
    assert index >= 0
    time.sleep(0.05)
    assert x.busy() == 1 and x.stop() == 1 and not x.free()
    index2, _ = x.submit(_usleep_address(), (WORD,), [1], [])
    assert index2 == -2  # stopping: refused
    deadline = time.monotonic() + 5
    while x.stop() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert x.take() == [(tag, 0)]
    assert x.free() and x.freed


def test_a_queued_call_past_its_deadline_never_reaches_the_module(
        token: dict[str, Any]) -> None:
    async def main() -> None:
        b = await _backend(token, "native", threads=1, call_timeout=5.0)
        try:
            s = await _session(b, token)
            b.keygen_timeout = 0.001
            b.call_timeout = 0.05
            slow = b.submit(C_GenerateKeyPair, _slow_keygen(s))
            queued = b.submit(C_GenerateRandom, [s, 8])
            with pytest.raises(BackendUnavailable, match="no free thread"):
                await queued
            with pytest.raises(BackendUnavailable):
                await slow
            assert b.timeouts == 2 and not b.up  # the only thread is hung
            deadline = time.monotonic() + 120
            while b.describe()["hung_calls"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            b.call_timeout = 5.0
            assert b.up and len((await b.call(C_GenerateRandom, [s, 8]))[0]) == 8
            assert not b._native_jobs  # the cancelled job was dropped, not left behind
        finally:
            await b.stop()

    asyncio.run(main())


def test_a_cache_directory_others_can_write_is_refused(
        token: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a library from a directory another user could write would run their code
    in the gateway: "native" refuses to start, "auto" falls back to Python threads."""
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    monkeypatch.setenv("P11GATE_CACHE_DIR", str(open_dir))
    monkeypatch.setattr(native_executor, "_lib", None)
    with pytest.raises(native_executor.ExecutorUnavailable, match="writable by others"):
        native_executor.load()

    async def main() -> None:
        b = InProcessBackend("soft", token["module"], executor="native")
        with pytest.raises(BackendUnavailable, match="writable by others"):
            await b.start()
        a = InProcessBackend("soft", token["module"], executor="auto")
        await a.start()
        try:
            assert a._module is not None and not a._module.shared  # b finalized it
            assert a.describe()["executor"] == "threads"
            assert a.executor_note is not None and "writable" in a.executor_note
            s = await _session(a, token)
            assert len((await a.call(C_GenerateRandom, [s, 8]))[0]) == 8
        finally:
            await a.stop()

    asyncio.run(main())


def test_without_a_compiler_auto_keeps_python_threads(
        token: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P11GATE_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native_executor, "_lib", None)

    async def main() -> None:
        a = InProcessBackend("soft", token["module"])  # executor = "auto"
        await a.start()
        try:
            assert a.describe()["executor"] == "threads"
            assert a.executor_note is not None and "failed" in a.executor_note
        finally:
            await a.stop()

    asyncio.run(main())
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700


def test_built_library_is_cached_privately(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P11GATE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setattr(native_executor, "_lib", None)
    native_executor.load()
    libs = list((tmp_path / "c").glob("p11gate-executor-*.so"))
    assert len(libs) == 1
    assert libs[0].stat().st_uid == os.geteuid()
    assert not libs[0].stat().st_mode & 0o022
    x = native_executor.NativeExecutor(2, 8)
    assert x.stop() >= 0
    deadline = time.monotonic() + 5
    while not x.free() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert x.freed


def test_cache_directory_follows_systemd_then_xdg(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("P11GATE_CACHE_DIR", raising=False)
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/p11gate")  # a unit's CacheDirectory=
    assert native_executor.cache_dir() == Path("/var/cache/p11gate")
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_executor.cache_dir() == tmp_path / "p11gate"
    monkeypatch.setenv("P11GATE_CACHE_DIR", str(tmp_path / "mine"))
    assert native_executor.cache_dir() == tmp_path / "mine"

"""Searches on a real `p11gate worker` travel as chains (backends/find_prefetch.py,
codec/chains.py): C_FindObjectsInit and the first C_FindObjects in one frame, the
client's Finds answered from that batch, the Final sent as it is. The answers must be
exactly the module's: the same handles in the same order for any batch size, the
module's own errors, and nothing kept across a session's close. The worker refuses
chains that are not searches. (In-process there are no chains: one native job for a
search's calls measured no cheaper than a job per call, docs/benchmarks.md.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends import find_prefetch
from p11gate.backends.base import Backend
from p11gate.backends.worker_process import WorkerBackend
from p11gate.codec import (
    CALLS,
    HANDSHAKE,
    MAX_VERSION,
    Attribute,
    FrameReader,
    build_frame,
    ckr,
    decode_reply,
    dialect_for_version,
    encode_request,
)
from p11gate.codec.chains import CHAIN_OPTIONS, decode_chain, encode_chain
from p11gate.config import BackendConfig
from p11gate.errors import Pkcs11Error

pytestmark = requires_softhsm

ID = {c.name: c.id for c in CALLS}
CKA_CLASS, CKA_TOKEN, CKA_LABEL = 0x0, 0x1, 0x3
CKO_DATA = 0


class _Recorder:
    """Stands in for the channel's transport: counts the frames written."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Trips:
    """Counts round trips to the worker: the frames written to it."""

    def __init__(self, b: WorkerBackend) -> None:
        assert b._chan is not None
        self._rec = _Recorder(b._chan.proto.transport)
        b._chan.proto.transport = self._rec  # type: ignore[assignment]

    def __call__(self) -> int:
        return len(list(FrameReader().feed(b"".join(self._rec.written))))


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> BackendConfig:
    token = make_token(tmp_path, keys=False)
    monkeypatch.setenv("SOFTHSM2_CONF", token["conf"])
    return BackendConfig(name="soft", module=token["module"],
                         env={"SOFTHSM2_CONF": token["conf"]}, **extra)


async def _session(b: Backend) -> int:
    (slots,) = await b.call(ID["C_GetSlotList"], [1, 8])
    (session,) = await b.call(ID["C_OpenSession"], [slots[0], 6])
    try:
        await b.call(ID["C_Login"], [session, 1, b"1234"])
    except Pkcs11Error as e:
        if e.rv != ckr.USER_ALREADY_LOGGED_IN:
            raise
    return int(session)


async def _data_objects(b: Backend, session: int, n: int, label: bytes) -> None:
    for i in range(n):
        text = label + b"-%d" % i
        await b.call(ID["C_CreateObject"], [session, [
            Attribute(CKA_CLASS, CKO_DATA, 8), Attribute(CKA_TOKEN, 0, 1),
            Attribute(CKA_LABEL, text, len(text))]])


async def _search(b: Backend, session: int, template: list[Attribute],
                  step: int) -> list[int]:
    await b.call(ID["C_FindObjectsInit"], [session, template])
    out: list[int] = []
    while True:
        (found,) = await b.call(ID["C_FindObjects"], [session, step])
        out += found
        if not found:
            break
    await b.call(ID["C_FindObjectsFinal"], [session])
    return out


def test_a_search_costs_two_round_trips_and_finds_what_the_module_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, monkeypatch)
    n_objects = find_prefetch.BATCH + 44  # more than one batch

    async def main() -> None:
        b = WorkerBackend(cfg)
        await b.start()
        try:
            session = await _session(b)
            await _data_objects(b, session, n_objects, b"many")
            await _data_objects(b, session, 3, b"few")
            everything = [Attribute(CKA_CLASS, CKO_DATA, 8)]
            few = [Attribute(CKA_LABEL, b"few-1", 5)]

            # what the module itself answers, without chains
            prefetch, b._prefetch = b._prefetch, None
            plain = {step: await _search(b, session, everything, step) for step in (1, 7, 300)}
            plain_few = await _search(b, session, few, 10)
            b._prefetch = prefetch
            assert len(plain[1]) == n_objects + 3 and len(set(plain[1])) == n_objects + 3
            assert plain[7] == plain[1] and plain[300] == plain[1]

            trips = _Trips(b)
            assert await _search(b, session, few, 10) == plain_few
            # Init + Find in one chain, the empty second Find answered here, the Final
            assert trips() == 2
            frame = next(FrameReader().feed(b"".join(trips._rec.written)))
            assert frame.options == CHAIN_OPTIONS and len(decode_chain(frame.body)) == 2

            for step in (1, 7, 300):
                assert await _search(b, session, everything, step) == plain[1]
            assert len(b._prefetch or ()) == 0  # every Final dropped its batch
        finally:
            await b.stop()

    asyncio.run(main())


def test_module_errors_and_session_ends_are_the_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, monkeypatch)

    async def main() -> None:
        b = WorkerBackend(cfg)
        await b.start()
        try:
            session = await _session(b)
            await _data_objects(b, session, 2, b"obj")
            template = [Attribute(CKA_CLASS, CKO_DATA, 8)]
            # an Init on a session that is not there: the module's error, nothing kept
            with pytest.raises(Pkcs11Error) as e:
                await b.call(ID["C_FindObjectsInit"], [session + 1000, template])
            assert e.value.rv == ckr.SESSION_HANDLE_INVALID
            # a second Init while one runs: the module's CKR_OPERATION_ACTIVE
            await b.call(ID["C_FindObjectsInit"], [session, template])
            with pytest.raises(Pkcs11Error) as e:
                await b.call(ID["C_FindObjectsInit"], [session, template])
            assert e.value.rv == ckr.OPERATION_ACTIVE
            # the module's search is still active until the Final: an operation of
            # another kind started meanwhile gets the module's own answer
            with pytest.raises(Pkcs11Error) as e:
                await b.call(ID["C_DigestInit"], [session, _sha256()])
            assert e.value.rv == ckr.OPERATION_ACTIVE
            # the first Init's search goes on: its batch answers
            (found,) = await b.call(ID["C_FindObjects"], [session, 1])
            assert len(found) == 1
            # the session closes under the search: the next session must not see it,
            # even if the module hands out the same handle again
            await b.call(ID["C_CloseSession"], [session])
            assert len(b._prefetch or ()) == 0
            again = await _session(b)
            with pytest.raises(Pkcs11Error) as e:
                await b.call(ID["C_FindObjects"], [again, 10])
            assert e.value.rv == ckr.OPERATION_NOT_INITIALIZED
            await b.call(ID["C_FindObjectsInit"], [again, template])
            (slots,) = await b.call(ID["C_GetSlotList"], [1, 8])
            await b.call(ID["C_CloseAllSessions"], [slots[0]])
            assert len(b._prefetch or ()) == 0
        finally:
            await b.stop()

    asyncio.run(main())


def _sha256() -> Any:
    from p11gate.codec import Mechanism
    return Mechanism(0x250, None)


def test_no_chains_to_other_worker_commands(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``worker_command`` (e.g. p11-kit remote) runs no chains: searches go call by call."""
    cfg = _config(tmp_path, monkeypatch, worker_command=[
        sys.executable, "-m", "p11gate.cli", "worker", "/usr/lib/softhsm/libsofthsm2.so"])
    assert WorkerBackend(cfg)._prefetch is None


def _worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[bytes]:
    cfg = _config(tmp_path, monkeypatch)
    env = dict(os.environ, SOFTHSM2_CONF=cfg.env["SOFTHSM2_CONF"])
    return subprocess.Popen([sys.executable, "-m", "p11gate.cli", "worker", cfg.module],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def _exchange(p: subprocess.Popen[bytes], frames: list[bytes]) -> bytes:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(bytes([MAX_VERSION]) + b"".join(frames))
    p.stdin.close()
    out = p.stdout.read()
    p.wait(20)
    return out


def test_the_worker_runs_only_searches_in_a_chain(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    d = dialect_for_version(MAX_VERSION)
    init = build_frame(1, encode_request(ID["C_Initialize"], [HANDSHAKE, 0, b"\0"], d))
    # a C_GenerateRandom (or anything but a search) in a chain: the stream is closed
    # unanswered, and the module never receives it
    bad = encode_chain([encode_request(ID["C_GenerateRandom"], [1, 16], d)])
    p = _worker(tmp_path, monkeypatch)
    out = _exchange(p, [init, build_frame(2, bad, CHAIN_OPTIONS)])
    frames = list(FrameReader().feed(out[1:]))
    assert [f.code for f in frames] == [1]
    assert p.returncode == 1
    # a broken chain body: closed too
    p = _worker(tmp_path / "b", monkeypatch)
    out = _exchange(p, [init, build_frame(2, b"\0\0\0\x09", CHAIN_OPTIONS)])
    assert [f.code for f in FrameReader().feed(out[1:])] == [1]
    assert p.returncode == 1
    # a search that fails at its Init: one reply, the error, nothing run after it
    chain = encode_chain([encode_request(ID["C_FindObjectsInit"], [77, []], d),
                          encode_request(ID["C_FindObjects"], [77, 5], d)])
    p = _worker(tmp_path / "c", monkeypatch)
    out = _exchange(p, [init, build_frame(3, chain, CHAIN_OPTIONS)])
    frames = list(FrameReader().feed(out[1:]))
    assert [f.code for f in frames] == [1, 3] and frames[1].options == CHAIN_OPTIONS
    replies = decode_chain(frames[1].body)
    assert len(replies) == 1
    with pytest.raises(Exception) as e:
        decode_reply(replies[0], d, ID["C_FindObjectsInit"])
    assert getattr(e.value, "rv", None) == ckr.SESSION_HANDLE_INVALID
    assert p.returncode == 0


def test_a_whole_search_in_one_round_trip(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``submit_search`` (a pool's member search): Init, Find and Final in one chain, the
    module's handles; None when there may be more than one batch; the module's errors."""
    cfg = _config(tmp_path, monkeypatch)

    async def main() -> None:
        b = WorkerBackend(cfg)
        await b.start()
        try:
            session = await _session(b)
            await _data_objects(b, session, find_prefetch.BATCH, b"full")
            await _data_objects(b, session, 5, b"five")
            five = await _search(b, session, [Attribute(CKA_LABEL, b"five-2", 6)], 10)
            trips = _Trips(b)
            fut = b.submit_search(session, [Attribute(CKA_LABEL, b"five-2", 6)])
            assert fut is not None
            assert await fut == five and len(five) == 1
            assert trips() == 1
            # the search was ended on the module: a new one starts
            fut = b.submit_search(session, [Attribute(CKA_CLASS, CKO_DATA, 8)])
            assert fut is not None
            assert await fut is None  # BATCH + 5 objects: searched call by call instead
            await b.call(ID["C_FindObjectsInit"], [session, []])  # nothing left running
            await b.call(ID["C_FindObjectsFinal"], [session])
            fut = b.submit_search(session + 1000, [])
            assert fut is not None
            with pytest.raises(Pkcs11Error) as e:
                await fut
            assert e.value.rv == ckr.SESSION_HANDLE_INVALID
        finally:
            await b.stop()

    asyncio.run(main())

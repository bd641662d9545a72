"""InProcessBackend against SoftHSMv2 loaded into the test process."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends.inprocess import InProcessBackend
from p11gate.codec import ckr
from p11gate.codec.values import Attribute, Mechanism
from p11gate.errors import BackendUnavailable, Pkcs11Error

pytestmark = requires_softhsm

C_GetInfo, C_GetSlotList, C_OpenSession, C_Login, C_GenerateKeyPair = 3, 4, 10, 18, 59
C_Sign, C_GenerateRandom = 43, 64


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    t = make_token(tmp_path_factory.mktemp("softhsm"), keys=False)
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = t["conf"]
    yield t
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(params=["threads", "native"])
def executor(request: pytest.FixtureRequest) -> str:
    """Every test runs on both kinds of module thread: Python threads, and the native
    executor (which must really be native here: gcc is installed by the test setup)."""
    return str(request.param)


async def _started(b: InProcessBackend) -> None:
    await b.start()
    assert b.describe()["executor"] == b.executor, b.executor_note


async def _session(b: InProcessBackend, token: dict[str, Any]) -> int:
    (slots,) = await b.call(C_GetSlotList, [1, 8])
    (session,) = await b.call(C_OpenSession, [slots[0], 6])
    try:
        await b.call(C_Login, [session, 1, token["pin"].encode()])
    except Pkcs11Error as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    return int(session)


def test_calls(token: dict[str, Any], executor: str) -> None:
    async def main() -> None:
        b = InProcessBackend("soft", token["module"], threads=4, executor=executor)
        assert not b.up
        with pytest.raises(BackendUnavailable):
            b.submit(C_GetInfo, [])
        await _started(b)
        assert b.up and b.generation == 1
        info = await b.call(C_GetInfo, [])
        assert info[1].startswith(b"SoftHSM")
        session = await _session(b, token)
        results = await asyncio.gather(
            *(b.submit(C_GenerateRandom, [session, 8 + i % 9]) for i in range(200))
        )
        assert [len(r[0]) for r in results] == [8 + i % 9 for i in range(200)]
        with pytest.raises(Pkcs11Error) as e:
            await b.call(C_Sign, [session, b"x", 64])
        assert e.value.rv == ckr.OPERATION_NOT_INITIALIZED
        d = b.describe()
        assert d["isolation"] == "none" and d["hung_calls"] == 0 and d["interface"] == "2.40"
        await b.stop()
        assert not b.up
        with pytest.raises(BackendUnavailable):
            await b.call(C_GetInfo, [])

    asyncio.run(main())


def test_missed_deadline(token: dict[str, Any], executor: str) -> None:
    async def main() -> None:
        b = InProcessBackend("soft", token["module"], threads=1, call_timeout=5.0,
                             executor=executor)
        await _started(b)
        session = await _session(b, token)
        b.call_timeout = 0.001  # an RSA-4096 key pair takes far longer
        b.keygen_timeout = 0.001  # (key generation has its own deadline)
        pub = [Attribute(0x121, 4096, 8), Attribute(0x1, 0, 1)]  # MODULUS_BITS, TOKEN=false
        slow = b.submit(C_GenerateKeyPair, [session, Mechanism(0x0), pub, [Attribute(0x1, 0, 1)]])
        queued = b.submit(C_GetInfo, [])  # waits for the only thread
        with pytest.raises(BackendUnavailable):
            await slow
        with pytest.raises(BackendUnavailable):
            await queued
        assert b.describe()["hung_calls"] == 1 and b.timeouts == 2
        assert not b.up  # every thread is hung
        deadline = time.monotonic() + 120
        while b.describe()["hung_calls"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b.up  # the module returned: the thread is free again
        b.call_timeout = 5.0
        assert (await b.call(C_GetInfo, []))[0] == (2, 40)
        await b.stop()

    asyncio.run(main())


def test_env_is_applied_before_loading(
    token: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_token(tmp_path, label="elsewhere", keys=False)
    monkeypatch.setenv("SOFTHSM2_CONF", "/nonexistent.conf")

    async def main() -> None:
        b = InProcessBackend("soft", other["module"], env={"SOFTHSM2_CONF": other["conf"]})
        await b.start()
        (slots,) = await b.call(C_GetSlotList, [1, 8])
        labels = [(await b.call(6, [s]))[0].rstrip() for s in slots]
        assert b"elsewhere" in labels
        await b.stop()

    asyncio.run(main())


def test_bad_module_path() -> None:
    async def main() -> None:
        b = InProcessBackend("nope", "/nonexistent/libnothing.so")
        with pytest.raises(BackendUnavailable):
            await b.start()

    asyncio.run(main())


def test_doorbell_rings_once_for_replies_that_finish_together(
    token: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:  # Python module threads (the native executor's bell: test_native_executor.py)
    """Module threads that finish while the loop has not yet drained skip their doorbell
    write; every reply still arrives (no job is left waiting for a bell nobody rings)."""
    rings = 0
    real_write = os.write

    async def main() -> None:
        nonlocal rings
        b = InProcessBackend("soft", token["module"], threads=4, executor="threads")
        await _started(b)
        try:
            session = await _session(b, token)

            def counting_write(fd: int, data: Any) -> int:
                nonlocal rings
                if fd == b._bell_w:
                    rings += 1
                return real_write(fd, data)

            monkeypatch.setattr(os, "write", counting_write)
            calls = 2000
            for _ in range(3):  # bursts: everything queued at once, then drained
                results = await asyncio.wait_for(asyncio.gather(
                    *(b.submit(C_GenerateRandom, [session, 16]) for _ in range(calls))), 60)
                assert [len(r[0]) for r in results] == [16] * calls
            monkeypatch.setattr(os, "write", real_write)
            assert 0 < rings < 3 * calls  # coalesced: fewer bells than replies
            # and a lone call after the bursts still wakes the loop by itself
            (one,) = await asyncio.wait_for(b.call(C_GenerateRandom, [session, 4]), 10)
            assert len(one) == 4
        finally:
            monkeypatch.setattr(os, "write", real_write)
            await b.stop()

    asyncio.run(main())

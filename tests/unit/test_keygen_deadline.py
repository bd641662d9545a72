"""Key generation has its own deadline (keygen_timeout): a legitimate slow generation
no longer misses call_timeout and costs the worker (and every session on it), in either
isolation mode; other calls keep call_timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from tests.softhsm import make_token

from p11gate.backends.deadlines import SLOW_CALLS, deadline
from p11gate.backends.inprocess import InProcessBackend
from p11gate.backends.worker_process import WorkerBackend
from p11gate.codec import ckr
from p11gate.codec.values import Attribute, Mechanism
from p11gate.config import BackendConfig
from p11gate.errors import Pkcs11Error

C_GetSlotList, C_OpenSession, C_Login, C_GenerateKey, C_GenerateKeyPair = 4, 10, 18, 58, 59
#: far below an RSA-3072 generation (hundreds of ms at least), far above a C_Login
CALL_TIMEOUT = 0.05


def test_which_calls_are_slow() -> None:
    assert SLOW_CALLS == {C_GenerateKey, C_GenerateKeyPair}
    assert deadline(C_GenerateKeyPair, 30.0, 300.0) == 300.0
    assert deadline(C_GetSlotList, 30.0, 300.0) == 30.0


async def _session(b: Any, pin: str) -> int:
    (slots,) = await b.call(C_GetSlotList, [1, 8])
    (session,) = await b.call(C_OpenSession, [slots[0], 6])
    try:
        await b.call(C_Login, [session, 1, pin.encode()])
    except Pkcs11Error as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    return int(session)


async def _generate(b: Any, session: int) -> float:
    pub = [Attribute(0x121, 3072, 8), Attribute(0x1, 0, 1)]  # MODULUS_BITS, TOKEN=false
    t0 = time.monotonic()
    await b.call(C_GenerateKeyPair, [session, Mechanism(0x0), pub, [Attribute(0x1, 0, 1)]])
    return time.monotonic() - t0


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_generation_longer_than_call_timeout_succeeds(
    isolation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = make_token(tmp_path, keys=False)
    monkeypatch.setenv("SOFTHSM2_CONF", token["conf"])
    cfg = BackendConfig(name="soft", module=token["module"], call_timeout=CALL_TIMEOUT,
                        keygen_timeout=120.0, env={"SOFTHSM2_CONF": token["conf"]})

    async def main() -> float:
        b: Any
        if isolation == "none":
            b = InProcessBackend("soft", token["module"], call_timeout=5.0,
                                 keygen_timeout=cfg.keygen_timeout)
        else:
            b = WorkerBackend(cfg.model_copy(update={"call_timeout": 5.0}))
        await b.start()
        try:
            # the session set-up under a comfortable deadline, the generation under a
            # call_timeout it cannot meet
            gen = b.generation
            session = await _session(b, token["pin"])
            if isolation == "none":
                b.call_timeout = CALL_TIMEOUT
            else:
                b.cfg = cfg
                b._chan.timeout = CALL_TIMEOUT  # what _spawn sets from call_timeout
            seconds = await _generate(b, session)
            assert b.up and b.generation == gen  # nothing was killed or restarted
            return seconds
        finally:
            await b.stop()

    seconds = asyncio.run(main())
    assert seconds > CALL_TIMEOUT

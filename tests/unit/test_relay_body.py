"""A request already encoded in the worker's dialect is relayed to a real `p11gate
worker` byte for byte (WorkerBackend.submit_body): the frame on the socket carries
exactly the body given, and the reply comes back as a body to relay; calls that need
rewriting or their own deadline, and other dialects, are refused (None)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends.worker_process import WorkerBackend
from p11gate.codec import CALLS, V025, FrameReader, decode_reply, encode_request
from p11gate.config import BackendConfig

pytestmark = requires_softhsm

ID = {c.name: c.id for c in CALLS}


class _Recorder:
    """Stands in for the channel's transport: keeps what is written, passes it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_request_body_is_relayed_byte_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = make_token(tmp_path, keys=False)
    monkeypatch.setenv("SOFTHSM2_CONF", token["conf"])
    cfg = BackendConfig(name="soft", module=token["module"], env={"SOFTHSM2_CONF": token["conf"]})

    async def main() -> None:
        b = WorkerBackend(cfg)
        await b.start()
        try:
            (slots,) = await b.call(ID["C_GetSlotList"], [1, 8])
            (session,) = await b.call(ID["C_OpenSession"], [slots[0], 6])
            chan = b._chan
            assert chan is not None
            d = chan.dialect
            rec = _Recorder(chan.proto.transport)
            chan.proto.transport = rec  # type: ignore[assignment]

            body = encode_request(ID["C_GenerateRandom"], [session, 24], d)
            fut = b.submit_body(ID["C_GenerateRandom"], body, d)
            assert fut is not None
            reply = await asyncio.wait_for(fut, 10)
            (random_bytes,) = decode_reply(reply, d, ID["C_GenerateRandom"])
            assert len(random_bytes) == 24

            frames = list(FrameReader().feed(b"".join(rec.written)))
            assert len(frames) == 1 and frames[0].body == body  # not re-encoded

            # other dialect, key generation (own deadline), a body for another call
            assert b.submit_body(ID["C_GenerateRandom"], body, V025 if d is not V025 else None) \
                is None
            keygen = ID["C_GenerateKeyPair"]
            assert b.submit_body(keygen, keygen.to_bytes(4, "big"), d) is None
            with pytest.raises(ValueError, match="not a request body"):
                b.submit_body(ID["C_GetInfo"], body, d)
            assert len(rec.written) == 1  # refused calls sent nothing
        finally:
            await b.stop()

    asyncio.run(main())

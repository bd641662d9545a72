"""The metrics endpoint in-process: content negotiation, bad requests, stalled and
surplus clients, and the state snapshot taken for each scrape."""

from __future__ import annotations

import asyncio

import pytest

from p11gate import metrics_http
from p11gate.metrics import GatewayMetrics, Snapshot
from p11gate.metrics_http import MetricsServer


async def exchange(port: int, request: bytes) -> bytes:
    """The whole reply; b"" when the server closed (or reset) without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def started(snapshots: list[int]) -> tuple[MetricsServer, int]:
    m = GatewayMetrics()

    def snap() -> Snapshot:
        snapshots.append(1)
        return {"p11gate_backend_up": [(("b",), float(len(snapshots)))]}

    server = MetricsServer("127.0.0.1:0", m, snap)
    await server.start()
    return server, int(server.bound.rsplit(":", 1)[1])


def test_text_openmetrics_and_errors() -> None:
    async def main() -> None:
        snaps: list[int] = []
        server, port = await started(snaps)
        try:
            text = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert text.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"text/plain; version=0.0.4" in text
            assert b'p11gate_backend_up{backend="b"} 1.0' in text
            om = await exchange(port, b"GET /metrics HTTP/1.1\r\nAccept: application/"
                                      b"openmetrics-text; version=1.0.0\r\n\r\n")
            assert b"application/openmetrics-text" in om and om.rstrip().endswith(b"# EOF")
            assert b'p11gate_backend_up{backend="b"} 2.0' in om  # a fresh snapshot each time
            head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
            for req, status in ((b"\x00\xff\r\n\r\n", b"400"), (b"GET / HTTP/1.1\r\n\r\n", b"404"),
                                (b"DELETE /metrics HTTP/1.1\r\n\r\n", b"405"),
                                (b"GET /metrics HTTP/1.1\r\nA: " + b"x" * 9000 + b"\r\n\r\n",
                                 b"431")):
                assert (await exchange(port, req)).split(b" ")[1] == status
            assert server.scrapes == 3 and len(snaps) == 3
        finally:
            await server.stop()

    asyncio.run(main())


def test_stalled_and_surplus_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(metrics_http, "MAX_CLIENTS", 2)

    async def main() -> None:
        server, port = await started([])
        try:
            stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, w in stalled:
                w.write(b"GET /metr")
            await asyncio.sleep(0.05)
            # a third one is closed at once, with no reply
            assert await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
            assert server.refused == 1
            # the stalled ones are dropped at the deadline; then scrapes work again
            for r, _ in stalled:
                assert await asyncio.wait_for(r.read(), 2) == b""
            ok = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200")
        finally:
            await server.stop()

    asyncio.run(main())

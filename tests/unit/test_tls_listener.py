"""Refused TLS handshakes are logged, but a flood of them does not flood the log."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from p11gate.frontend.tls_listener import LOG_BURST, TlsListener


def test_refusals_beyond_the_burst_are_counted_not_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    lst = TlsListener(asyncio.Protocol, ssl.create_default_context())
    with caplog.at_level(logging.WARNING, logger="p11gate.server"):
        for i in range(LOG_BURST + 5):
            lst._log_refusal(f"10.0.0.1:{i}", "unsupported protocol")
        singles = [r for r in caplog.records if r.getMessage() == "TLS client refused"]
        assert len(singles) == LOG_BURST
        lst._window -= 2.0  # the next second
        lst._log_refusal("10.0.0.1:1", "unsupported protocol")
    summary = [r for r in caplog.records if "not logged one by one" in r.getMessage()]
    assert len(summary) == 1 and summary[0].count == 5  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if r.getMessage() == "TLS client refused"]) \
        == LOG_BURST + 1

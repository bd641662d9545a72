"""RestartFailures over a long outage (simulated clock): a few records, not one per try."""

from __future__ import annotations

import logging

import pytest

from p11gate.backends import worker_output
from p11gate.backends.worker_output import LONG_FAILURE_DELAY, RestartFailures


def test_an_hour_of_failures_is_a_few_dozen_records(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(worker_output.time, "monotonic", lambda: now[0])
    f = RestartFailures("hsm")
    caplog.set_level(logging.INFO, logger="p11gate.backend")
    tries = 0
    while now[0] < 1000.0 + 3600:
        assert f.verbose() == (f.streak < 3)
        delay = f.max_delay(5.0)
        f.failed("not a PKCS#11 module", delay)
        tries += 1
        now[0] += delay
    assert f.max_delay(5.0) == LONG_FAILURE_DELAY  # failing for an hour: tried less often
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[:3] == ["backend restart failed"] * 3
    assert msgs[3].startswith("backend keeps failing to start")
    summaries = [r for r in caplog.records if r.getMessage() == "backend still failing to restart"]
    assert 55 <= len(summaries) <= 61 and len(msgs) == 4 + len(summaries)
    assert sum(r.__dict__["failures"] for r in summaries) >= tries - 3 - 30
    f.recovered()
    assert caplog.records[-1].getMessage() == "backend started after failing"
    assert f.streak == 0 and f.verbose() and f.max_delay(5.0) == 5.0

"""A client's refused requests wrote a log record each, at the client's pace: a
template naming an attribute twice, one with an attribute without a value, a policy
denial, a key size beyond max_key_bits, a login while locked out, a bad frame (one per
connection, the client reconnecting). One raw-frame client wrote some 25 000 warnings a
second (5 000 duplicated-attribute C_CreateObject calls: 5 000 records in 0.2 s),
filling the disk or journal and burying other clients' records. They now go through a
per-identity limiter (frontend/limits.py, refusal_log): REFUSAL_LOG_BURST records per
REFUSAL_LOG_PERIOD seconds for each message and identity, then one summary record with
the count (at the end of the window, or at shutdown).

A real gateway over SoftHSM; a bystander is answered throughout."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_VALUE,
    CKO_DATA,
    CKU_USER,
    logged_in,
    pipeline,
    rv,
    u,
)
from tests.gateway_proc import Gateway, RawClient, write_config
from tests.softhsm import make_token

from p11gate.codec import Attribute, ckr
from p11gate.frontend.limits import REFUSAL_LOG_BURST, LogLimiter

N = 2000


def counts(gw: Gateway) -> Counter[str]:
    return Counter(str(r.get("msg")) for r in gw.records())


def summaries(gw: Gateway, msg: str) -> int:
    return sum(int(r.get("count", 0)) for r in gw.records()
               if r.get("msg") == f"{msg} (more, not logged one by one)")


def test_refusals_do_not_flood_the_log(tmp_path: Path) -> None:
    gw = Gateway(write_config(tmp_path, make_token(tmp_path / "hsm", keys=False)))
    try:
        bystander, bs = logged_in(gw)
        c, sess = logged_in(gw)
        twice = [u(CKA_CLASS, CKO_DATA), u(CKA_CLASS, CKO_DATA)]
        no_value = [u(CKA_CLASS, CKO_DATA), Attribute(CKA_VALUE, None, None)]
        assert set(pipeline(c, [("C_CreateObject", [sess, twice])] * N)) == {
            ckr.TEMPLATE_INCONSISTENT}
        assert set(pipeline(c, [("C_CreateObject", [sess, no_value])] * N)) == {
            ckr.ATTRIBUTE_VALUE_INVALID}
        for _ in range(300):  # a bad frame per connection, reconnecting
            bad = RawClient(gw.path)
            bad.send_raw(b"\xff" * 12)
            assert bad.closed_by_peer()
            bad.close()
        assert pipeline(bystander, [("C_GetSessionInfo", [bs])]) == [ckr.OK]
        seen = counts(gw)
        for msg in ("template names an attribute twice",
                    "template has an attribute without a value",
                    "closing client connection"):
            # unlimited: 2000, 2000 and 300
            assert seen[msg] == REFUSAL_LOG_BURST, (msg, seen[msg])
        assert len(gw.log().splitlines()) < 3 * REFUSAL_LOG_BURST + 2 * 300 + 100
        c.close()
        bystander.close()
    finally:
        gw.stop()
    # what was held back is counted, not lost
    assert summaries(gw, "template names an attribute twice") == N - REFUSAL_LOG_BURST
    assert summaries(gw, "closing client connection") == 300 - REFUSAL_LOG_BURST


def test_locked_out_logins_do_not_flood_the_log(tmp_path: Path) -> None:
    gw = Gateway(write_config(tmp_path, make_token(tmp_path / "hsm", keys=False)))
    try:
        c, sess = logged_in(gw)
        assert rv(c, "C_Logout", sess) == ckr.OK
        got = Counter(rv(c, "C_Login", sess, CKU_USER, b"wrong") for _ in range(300))
        assert got[ckr.PIN_LOCKED] > 250, got
        assert counts(gw)["login refused: too many wrong PINs"] == REFUSAL_LOG_BURST
        c.close()
    finally:
        gw.stop()


def test_one_identity_does_not_use_up_another_s_records(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.refusals")
    lim = LogLimiter(logger, burst=5, period=60.0, max_windows=3)

    async def run() -> None:
        for _ in range(1000):
            lim.warning("denied by policy", who="uid:666")
        lim.warning("denied by policy", who="uid:1000")
        for n in range(10):  # more identities than windows: the newcomers share one
            for _ in range(10):
                lim.warning("denied by policy", who=f"uid:{2000 + n}")
        assert len(lim._windows) <= 4
        lim.flush_all()

    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        asyncio.run(run())
    plain = [r for r in caplog.records if r.getMessage() == "denied by policy"]
    assert len(plain) <= 5 + 1 + 5 + 5 * 2
    summary = {r.identity: r.count for r in caplog.records  # type: ignore[attr-defined]
               if "not logged one by one" in r.getMessage()}
    assert summary["uid:666"] == 995
    assert sum(summary.values()) + len(plain) == 1000 + 1 + 100

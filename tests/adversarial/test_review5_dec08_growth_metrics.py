"""Metrics cardinality under what clients send. Label values are configured names, call
names from the codec's table and CKR names (codes outside the table fold into two
names), so a client cycling through vendor mechanism numbers, attribute types, PINs or
reconnects adds no series: probed with a real gateway and found bounded (the scrape's
sample count is the same after the flood as after its first round).

Found: each (token, call) series kept a count per raw CK_RV before folding them at
scrape time, so a module (or back end) answering with ever new vendor codes grew that
dict by one entry per code for ever. Codes outside the table are folded in
CallSeries.done once MAX_RESULTS distinct ones are held."""

from __future__ import annotations

from pathlib import Path

from tests.adversarial.hostile import CKA_CLASS, CKO_DATA, logged_in, pipeline, u
from tests.gateway_proc import Gateway
from tests.integration.test_metrics import metrics_gateway
from tests.metrics_scrape import scrape
from tests.softhsm import make_token

from p11gate.codec import Attribute, Mechanism, ckr
from p11gate.metrics import MAX_RESULTS, CallsCollector, CallSeries


def test_ever_new_result_codes_do_not_grow_a_series() -> None:
    s = CallSeries("t", "C_Sign")
    for i in range(100_000):
        s.done(0.001, 0x80000000 + i)
        s.done(0.001, 0x7000 + i % 1000)
    s.done(0.001, ckr.OK)
    assert len(s.by_rv) <= MAX_RESULTS + 3  # the folded two and CKR_OK; unbounded: 101 001
    (calls, _), = [list(CallsCollector({("t", 0): s}).collect())]
    by = {smp.labels["result"]: smp.value for smp in calls.samples}
    assert by["CKR_VENDOR_DEFINED"] == 100_000 and by["CKR_UNKNOWN"] == 100_000
    assert by["CKR_OK"] == 1


def _flood(gw: Gateway, first: int) -> None:
    c, sess = logged_in(gw)
    pipeline(c, [("C_DeriveKey", [sess, Mechanism(0x80000000 + first + i, None), 0xDEAD, []])
                 for i in range(500)])
    pipeline(c, [("C_CreateObject", [sess, [u(CKA_CLASS, CKO_DATA),
                                            Attribute(0x80000000 + first + i, b"x", 1)]])
                 for i in range(500)])
    pipeline(c, [("C_Login", [sess, 1, b"wrong-%d" % i]) for i in range(5)])
    c.close()


def test_client_values_add_no_series(tmp_path: Path) -> None:
    gw, address = metrics_gateway(tmp_path, make_token(tmp_path / "hsm", keys=False),
                                  "127.0.0.1:0")
    try:
        _flood(gw, 0)
        first, _ = scrape(address)
        for n in range(1, 5):
            _flood(gw, n * 1000)
        after, _ = scrape(address)
        assert set(after) == set(first), set(after) ^ set(first)
    finally:
        gw.stop()

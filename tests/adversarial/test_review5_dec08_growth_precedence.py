"""The module's handle-independent refusals (CKR_MECHANISM_INVALID,
CKR_FUNCTION_NOT_SUPPORTED) are cached per backend, call and mechanism type
(frontend/precedence.py). The mechanism type is the client's: a raw-frame client
cycling through vendor mechanism numbers with an unknown key handle added one entry per
call, for ever (some 140 bytes each: 2.7 MiB of gateway RSS per 20 000 C_DeriveKey
calls, across connections, for the life of the process). The cache now holds at most
MAX_CACHED answers per backend.

A real gateway over SoftHSM (process isolation: the gateway's own RSS is measured, not
the module's); a bystander keeps signing throughout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.adversarial.hostile import logged_in, pipeline, stop_gateway
from tests.gateway_proc import Gateway, write_config
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr

#: the first vendor-defined mechanism number
CKM_VENDOR = 0x80000000
BATCH = 1000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("growth-precedence")
    gw = Gateway(write_config(base, make_token(base / "hsm", keys=False), "process"))
    yield gw
    stop_gateway(gw)


def _flood(gw: Gateway, first: int, count: int) -> set[int]:
    c, sess = logged_in(gw)
    seen: set[int] = set()
    try:
        for start in range(first, first + count, BATCH):
            seen |= set(pipeline(c, [
                ("C_DeriveKey", [sess, Mechanism(CKM_VENDOR + i, None), 0xDEAD, []])
                for i in range(start, start + BATCH)]))
    finally:
        c.close()
    return seen


def test_vendor_mechanism_numbers_do_not_grow_the_refusal_cache(gateway: Gateway) -> None:
    bystander, bs = logged_in(gateway)
    # fill the cache to its bound (and the allocator's arenas) first
    assert _flood(gateway, 0, 5 * BATCH) == {ckr.MECHANISM_INVALID}
    before = rss_kib(gateway.proc.pid)
    # each connection its own numbers: what one connection taught must not pile up
    for n in range(4):
        assert _flood(gateway, (5 + 10 * n) * BATCH, 10 * BATCH) == {ckr.MECHANISM_INVALID}
    grown = rss_kib(gateway.proc.pid) - before
    # unbounded: about 5.5 MiB for these 40 000 mechanism numbers
    assert grown < 1536, f"gateway RSS grew by {grown} KiB"
    # the cache still answers (and the bystander was not affected)
    assert _flood(gateway, 0, BATCH) == {ckr.MECHANISM_INVALID}
    assert pipeline(bystander, [("C_GetSessionInfo", [bs])]) == [ckr.OK]
    bystander.close()

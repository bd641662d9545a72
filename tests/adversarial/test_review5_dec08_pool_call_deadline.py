"""A call that misses ``call_timeout`` marks its member down (the worker is killed under
it) and, for a hung member, is retried on the next one. But how long most calls take is
the client's to choose (data size, mechanism, key): one slow call was retried on every
member in turn, up to ``max_attempts``, and took each one's worker -- every tenant's
sessions on the pool -- down with it. Key generation was exempted first
(test_review5_dec08_pool_keygen_deadline.py); this is every other call.

Now a deadline costs one member per client call: a member that still answered (other
calls, or the pool's liveness probe) while the call was past a quarter of its deadline
was not hung, the call was slow, and it is not retried; and a call that has cost one
member a missed deadline is not retried on another whatever the evidence. The client
gets CKR_DEVICE_ERROR.

Raw frames, a real gateway over a three-member SoftHSM pool with ``call_timeout`` 0.1 s,
and an RSA-16384 private key on each member: one C_Sign with it takes SoftHSM about
0.19 s here (measured with python-pkcs11 on the bare module: 0.186-0.188 s)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import CKA_CLASS, CKA_LABEL, CKO_PRIVATE_KEY, logged_in, rv, s, u
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.pools.members import PIN, make_member, pool_config
from tests.softhsm import _run

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr

KEY = Path(__file__).parent / "data" / "rsa16384-test-only.pem"
CKM_RSA_PKCS = 0x1


def _members(tmp_path: Path) -> list[dict[str, Any]]:
    members = [make_member(tmp_path, i, None) for i in range(3)]
    for m in members:
        _run(["softhsm2-util", "--import", str(KEY), "--token", m["label"], "--label",
              "rsa16k", "--id", "10", "--pin", PIN], m["env"])
    return members


def _key(c: RawClient, sess: int) -> int:
    (key,) = c.find(sess, [u(CKA_CLASS, CKO_PRIVATE_KEY), s(CKA_LABEL, b"rsa16k")])
    return int(key)


def _downs(admin: str) -> list[int]:
    return sorted(m["downs"] for m in query(admin)["pools"][0]["members"])


def _all_up(admin: str) -> bool:
    return all(m["state"] == "up" for m in query(admin)["pools"][0]["members"])


@pytest.mark.parametrize(("threads", "expected"), [(4, [0, 0, 1]), (1, [0, 1, 1])])
def test_a_slow_call_takes_down_one_member_not_the_pool(
        tmp_path: Path, threads: int, expected: list[int]) -> None:
    """With ``threads = 4`` the pool's liveness probe is answered while the sign runs:
    the member is known alive, the call alone is to blame, one member. With ``threads =
    1`` the probe waits behind the sign, the member looks hung, and the call is retried
    once: two members at most, never the whole pool."""
    cfg = pool_config(tmp_path, _members(tmp_path), call_timeout=0.1, threads=threads)
    gw = Gateway(cfg)
    admin = str(tmp_path / "state" / "admin.sock")
    try:
        c, sess = logged_in(gw)
        c.sock.settimeout(60)
        key = _key(c, sess)
        assert _downs(admin) == [0, 0, 0]
        t0 = time.monotonic()
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_RSA_PKCS, None), key) == ckr.OK
        got = rv(c, "C_Sign", sess, b"\x01" * 32, 2048)
        took = time.monotonic() - t0
        assert got == ckr.DEVICE_ERROR
        downs = _downs(admin)
        print(f"\nSLOW CALL: rv {ckr.name(got)} after {took:.2f}s, member downs {downs}")
        assert downs == expected, query(admin)  # before: [1, 1, 1], every worker killed
        assert took < 0.25 * (1 + expected.count(1))  # its deadlines, not one per member
        # the pool serves on, and the member comes back by itself
        assert rv(c, "C_GenerateRandom", sess, 16) == ckr.OK
        assert wait_for(lambda: _all_up(admin), 20)
        c.close()
    finally:
        gw.stop()

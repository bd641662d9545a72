"""A call that misses its deadline marks its member down (the worker is killed under it)
and, for a hung member, is retried on the next one. A key generation's length is the
client's to choose within ``max_key_bits``: one RSA-8192 generation past
``keygen_timeout`` was retried on every member in turn and killed each one's worker,
every tenant's sessions on the whole pool with them. A key generation that missed its
deadline is now not retried elsewhere: one member, as on a plain token, and the client
gets CKR_DEVICE_ERROR.

Raw frames, a real gateway over a three-member SoftHSM pool with ``keygen_timeout = 1``
(an RSA-8192 generation takes SoftHSM seconds)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.adversarial.hostile import CKA_SIGN, CKA_TOKEN, CKA_VERIFY, b, logged_in, rv, s, u
from tests.gateway_proc import Gateway, wait_for
from tests.pools.members import make_member, pool_config

from p11gate.admin import query
from p11gate.codec import Mechanism, ckr

CKM_RSA_PKCS_KEY_PAIR_GEN, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT = 0x0, 0x121, 0x122


def test_a_slow_key_generation_takes_down_one_member_not_the_pool(tmp_path: Path) -> None:
    members = [make_member(tmp_path, i, None) for i in range(3)]
    cfg = pool_config(tmp_path, members)
    cfg.write_text(cfg.read_text().replace("restart_delay = 0.2",
                                           "restart_delay = 0.2\nkeygen_timeout = 1.0"))
    gw = Gateway(cfg)
    admin = str(tmp_path / "state" / "admin.sock")
    try:
        c, sess = logged_in(gw)
        c.sock.settimeout(60)
        pub = [u(CKA_MODULUS_BITS, 8192), s(CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
               b(CKA_TOKEN, False), b(CKA_VERIFY, True)]
        priv = [b(CKA_TOKEN, False), b(CKA_SIGN, True)]
        t0 = time.monotonic()
        assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                  pub, priv) == ckr.DEVICE_ERROR
        assert time.monotonic() - t0 < 2.5  # one deadline, not one per member
        st = query(admin)["pools"][0]["members"]
        downs = sorted(m["downs"] for m in st)
        assert downs == [0, 0, 1], st  # before: [1, 1, 1], every worker killed
        # the pool serves on, and the member comes back by itself
        assert rv(c, "C_GenerateRandom", sess, 16) == ckr.OK
        assert wait_for(lambda: all(m["state"] == "up"
                                    for m in query(admin)["pools"][0]["members"]), 20)
        c.close()
    finally:
        gw.stop()

"""The soft token's kept size-query results (fourth review): after C_DigestFinal with a
NULL buffer the digest is kept for the retry, and a C_DigestUpdate or C_DigestKey in
between added input the kept digest did not cover: the retry returned the digest of
less than the client had sent. They are now refused (CKR_ARGUMENTS_BAD, the operation
ends), as a retry with other data already was."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.adversarial.hostile import b, call, rv, s, u
from tests.gateway_proc import Gateway, RawClient
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config

from p11gate.codec import Mechanism, ckr

CKM_SHA256, CKM_AES_KEY_GEN = 0x250, 0x1080
CKA_VALUE_LEN, CKA_EXTRACTABLE, CKA_LABEL = 0x161, 0x162, 0x3


def test_no_more_input_after_a_digest_size_query(tmp_path: Path) -> None:
    gw = Gateway(soft_gateway_config(tmp_path))
    try:
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], 6)
        call(c, "C_Login", sess, 1, USER_PIN.encode())
        (key,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                      [u(CKA_VALUE_LEN, 16), b(CKA_EXTRACTABLE, True), s(CKA_LABEL, "dk")])
        for follow in (("C_DigestUpdate", b"second part"), ("C_DigestKey", key)):
            call(c, "C_DigestInit", sess, Mechanism(CKM_SHA256, None))
            call(c, "C_DigestUpdate", sess, b"first part")
            (n,) = call(c, "C_DigestFinal", sess, 0)
            assert n.length == 32
            assert rv(c, follow[0], sess, follow[1]) == ckr.ARGUMENTS_BAD, follow[0]
            assert rv(c, "C_DigestFinal", sess, 64) == ckr.OPERATION_NOT_INITIALIZED
        # the size query and its retry, with nothing in between, still work
        call(c, "C_DigestInit", sess, Mechanism(CKM_SHA256, None))
        call(c, "C_DigestUpdate", sess, b"first part")
        call(c, "C_DigestFinal", sess, 0)
        assert call(c, "C_DigestFinal", sess, 64) == [hashlib.sha256(b"first part").digest()]
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]

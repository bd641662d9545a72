"""The KMIP token from raw frames (fourth review): a size query's kept result is only
for the call it was asked for, templates are honoured or refused (never silently made
weaker), and a key serves only mechanisms of its type. Each part fails without its fix:
the retry with other data got the first data's ciphertext; CKA_DECRYPT=false, a vendor
attribute, CKA_ALWAYS_AUTHENTICATE, CKA_CLASS of a data object were dropped; an AES
mechanism went to the server with an RSA key."""

from __future__ import annotations

import os
from pathlib import Path

from tests.adversarial.hostile import b, call, rv, s, u
from tests.gateway_proc import Gateway, RawClient
from tests.kmip_backend.conftest import kmip_gateway_config, kmip_server  # noqa: F401
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.kmip_backend.test_kmip_raw import (
    CKA_LABEL,
    CKA_MODULUS_BITS,
    CKA_VALUE_LEN,
    CKM_AES_CBC_PAD,
    CKM_AES_KEYGEN,
    CKM_RSA_KEYGEN,
    CKM_SHA256_RSA,
    MSG,
    session,
)

from p11gate.codec import AttrRequest, Mechanism, ckr
from p11gate.codec.values import IvParams

CKA_CLASS, CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_SENSITIVE = 0x0, 0x104, 0x105, 0x108, 0x103
CKA_ALWAYS_AUTHENTICATE, VENDOR = 0x202, 0x80001234


def _aes(c: RawClient, sess: int, *extra: object) -> int:
    (key,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                  [u(CKA_VALUE_LEN, 16), s(CKA_LABEL, "ops-aes"), *extra])
    return int(key)


def _pair(c: RawClient, sess: int, *priv_extra: object) -> tuple[int, int]:
    pub, priv = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                     [u(CKA_MODULUS_BITS, 2048)], [s(CKA_LABEL, "ops-rsa"), *priv_extra])
    return pub, priv


def test_size_query_result_only_for_the_same_call(kmip_server: KmipServerProc,  # noqa: F811
                                                  tmp_path: Path) -> None:
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    try:
        c, sess = session(gw)
        aes = _aes(c, sess)
        iv = os.urandom(16)
        cbc = Mechanism(CKM_AES_CBC_PAD, IvParams(iv))
        # the size query encrypts "A"s; the call that follows sends "B"s
        call(c, "C_EncryptInit", sess, cbc, aes)
        (n,) = call(c, "C_Encrypt", sess, b"A" * 20, 0)
        assert n.length == 32
        assert rv(c, "C_Encrypt", sess, b"B" * 20, 256) == ckr.ARGUMENTS_BAD
        # ... which also ended the operation
        assert rv(c, "C_Encrypt", sess, b"A" * 20, 256) == ckr.OPERATION_NOT_INITIALIZED
        # the same call again gets the kept result (one KMIP call for the two)
        before = kmip_server.operations("Encrypt")
        call(c, "C_EncryptInit", sess, cbc, aes)
        call(c, "C_Encrypt", sess, b"B" * 20, 0)
        (ct,) = call(c, "C_Encrypt", sess, b"B" * 20, 256)
        assert kmip_server.operations("Encrypt") == before + 1
        call(c, "C_DecryptInit", sess, cbc, aes)
        assert call(c, "C_Decrypt", sess, ct, 256) == [b"B" * 20]
        # a signature's size query of the Final: no more data after it, nor a one-part
        # call with data in its place
        _pub, priv = _pair(c, sess)
        mech = Mechanism(CKM_SHA256_RSA, None)
        for follow in (("C_SignUpdate", b"more"), ("C_Sign", MSG, 512)):
            call(c, "C_SignInit", sess, mech, priv)
            call(c, "C_SignUpdate", sess, MSG)
            call(c, "C_SignFinal", sess, 0)
            assert rv(c, follow[0], sess, *follow[1:]) == ckr.ARGUMENTS_BAD
            assert rv(c, "C_SignFinal", sess, 512) == ckr.OPERATION_NOT_INITIALIZED
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]


def test_templates_honoured_or_refused(kmip_server: KmipServerProc,  # noqa: F811
                                       tmp_path: Path) -> None:
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    try:
        c, sess = session(gw)
        # a usage switched off is off, in the attributes and for the operation
        aes = _aes(c, sess, b(CKA_DECRYPT, False))
        attrs, code = call(c, "C_GetAttributeValue", sess, aes,
                           [AttrRequest(CKA_ENCRYPT, 1), AttrRequest(CKA_DECRYPT, 1)])
        assert code == ckr.OK and [a.value for a in attrs] == [1, 0]
        iv = IvParams(os.urandom(16))
        assert rv(c, "C_DecryptInit", sess, Mechanism(CKM_AES_CBC_PAD, iv),
                  aes) == ckr.KEY_FUNCTION_NOT_PERMITTED
        _pub, priv = _pair(c, sess, b(CKA_SIGN, False))
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_SHA256_RSA, None),
                  priv) == ckr.KEY_FUNCTION_NOT_PERMITTED
        # what the token cannot keep is refused, before the server makes anything
        before = kmip_server.operations("Create")
        assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                  [u(CKA_VALUE_LEN, 16), s(VENDOR, b"\x05")]) == ckr.ATTRIBUTE_TYPE_INVALID
        assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                  [u(CKA_VALUE_LEN, 16), u(CKA_CLASS, 0)]) == ckr.TEMPLATE_INCONSISTENT
        assert kmip_server.operations("Create") == before
        assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                  [u(CKA_MODULUS_BITS, 2048)],
                  [b(CKA_ALWAYS_AUTHENTICATE, True)]) == ckr.ATTRIBUTE_TYPE_INVALID
        # an attribute named twice never gets this far (the gateway refuses it)
        assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                  [u(CKA_VALUE_LEN, 16), b(CKA_SENSITIVE, False),
                   b(CKA_SENSITIVE, True)]) == ckr.TEMPLATE_INCONSISTENT
        # an AES mechanism with an RSA key does not reach the server
        before = kmip_server.operations("Decrypt")
        assert rv(c, "C_DecryptInit", sess, Mechanism(CKM_AES_CBC_PAD, iv),
                  priv) == ckr.KEY_TYPE_INCONSISTENT
        assert kmip_server.operations("Decrypt") == before
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]

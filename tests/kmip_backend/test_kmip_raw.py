"""The KMIP token from raw RPC frames (no p11-kit-client.so checks in between): no
private material for a hostile client, foreign handles refused, what the server cannot
do refused with the right CK_RV, and a KMIP server that dies mid-loop and comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.adversarial.hostile import b, call, rv, s, u
from tests.gateway_proc import Gateway, RawClient
from tests.kmip_backend.conftest import USER_PIN, kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc

from p11gate.codec import AttrRequest, Mechanism, ckr
from p11gate.codec.tables import V026
from p11gate.codec.values import IvParams, PssParams

CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1 = 0x120, 0x122, 0x123, 0x124
CKA_VALUE, CKA_LABEL, CKA_MODULUS_BITS, CKA_VALUE_LEN = 0x11, 0x3, 0x121, 0x161
CKM_RSA_KEYGEN, CKM_AES_KEYGEN, CKM_EC_KEYGEN = 0x0, 0x1080, 0x1040
CKM_RSA_PKCS, CKM_SHA256_RSA, CKM_SHA256_PSS, CKM_AES_CBC_PAD = 0x1, 0x40, 0x43, 0x1085
CKM_SHA256, CKG_MGF1_SHA256 = 0x250, 2
MSG = b"raw frames to the KMIP token"


def session(gw: Gateway, login: bool = True) -> tuple[RawClient, int]:
    # the 0.26 dialect carries every mechanism parameter (PSS, CBC IVs)
    c = RawClient(gw.path, version=2, dialect=V026, timeout=30)
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    (sess,) = call(c, "C_OpenSession", slots[0], 6)
    if login:
        call(c, "C_Login", sess, 1, USER_PIN.encode())
    return c, sess


def rsa_pair(c: RawClient, sess: int, label: str) -> tuple[int, int]:
    pub, priv = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                     [u(CKA_MODULUS_BITS, 2048), s(CKA_LABEL, label)], [s(CKA_LABEL, label)])
    return pub, priv


def public_key(c: RawClient, sess: int, pub: int) -> rsa.RSAPublicKey:
    attrs, code = call(c, "C_GetAttributeValue", sess, pub,
                       [AttrRequest(CKA_MODULUS, 1024), AttrRequest(CKA_PUBLIC_EXPONENT, 16)])
    assert code == ckr.OK
    n, e = (int.from_bytes(a.value, "big") for a in attrs)
    return rsa.RSAPublicNumbers(e, n).public_key()


def sign(c: RawClient, sess: int, priv: int, mech: Mechanism) -> bytes:
    call(c, "C_SignInit", sess, mech, priv)
    (sig,) = call(c, "C_Sign", sess, MSG, 512)
    assert isinstance(sig, bytes)
    return sig


def test_hostile_client_gets_no_private_material(kmip_server: KmipServerProc,
                                                 tmp_path: Path) -> None:
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    try:
        c, sess = session(gw)
        pub, priv = rsa_pair(c, sess, "raw-rsa")
        (aes,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                      [u(CKA_VALUE_LEN, 32), s(CKA_LABEL, "raw-aes")])
        for h, kinds in ((priv, (CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_VALUE)),
                         (aes, (CKA_VALUE,))):
            for kind in kinds:
                attrs, code = call(c, "C_GetAttributeValue", sess, h,
                                   [AttrRequest(kind, 4096)])
                assert code == ckr.ATTRIBUTE_SENSITIVE and attrs[0].value is None
        # handles nobody was given, and a private key seen from a public session
        for h in (0x7777, priv + 1000, 0xFFFFFFFF):
            assert rv(c, "C_GetAttributeValue", sess, h,
                      [AttrRequest(CKA_LABEL, 64)]) == ckr.OBJECT_HANDLE_INVALID
            assert rv(c, "C_DestroyObject", sess, h) == ckr.OBJECT_HANDLE_INVALID
        other, osess = session(gw, login=False)
        assert rv(other, "C_GetAttributeValue", osess, priv,
                  [AttrRequest(CKA_LABEL, 64)]) == ckr.OBJECT_HANDLE_INVALID
        assert rv(other, "C_SignInit", osess, Mechanism(CKM_SHA256_RSA, None),
                  priv) == ckr.KEY_HANDLE_INVALID
        other.close()
        # what the KMIP server cannot do: refused, not emulated
        assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_EC_KEYGEN, None), [],
                  []) == ckr.MECHANISM_INVALID
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_RSA_PKCS, None),
                  priv) == ckr.MECHANISM_INVALID
        assert rv(c, "C_GenerateRandom", sess, 32) == ckr.RANDOM_NO_RNG
        # no session objects on a KMIP server: refused, not made a token object
        assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                  [u(CKA_VALUE_LEN, 16), b(0x1, False)]) == ckr.TEMPLATE_INCONSISTENT
        # nor extractable or non-sensitive keys: the gateway would have to lie about them
        for flag in (b(0x162, True), b(0x103, False)):
            assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                      [u(CKA_VALUE_LEN, 16), flag]) == ckr.TEMPLATE_INCONSISTENT
            assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                      [u(CKA_MODULUS_BITS, 2048)], [flag]) == ckr.TEMPLATE_INCONSISTENT
        # PSS: the server's salt is the largest one; a client asking for 32 is refused
        assert rv(c, "C_SignInit", sess, Mechanism(CKM_SHA256_PSS, PssParams(
            CKM_SHA256, CKG_MGF1_SHA256, 32)), priv) == ckr.MECHANISM_PARAM_INVALID
        key = public_key(c, sess, pub)
        max_salt = 256 - 32 - 2
        sig = sign(c, sess, priv, Mechanism(CKM_SHA256_PSS, PssParams(
            CKM_SHA256, CKG_MGF1_SHA256, max_salt)))
        key.verify(sig, MSG, padding.PSS(padding.MGF1(hashes.SHA256()), max_salt),
                   hashes.SHA256())
        key.verify(sign(c, sess, priv, Mechanism(CKM_SHA256_RSA, None)), MSG,
                   padding.PKCS1v15(), hashes.SHA256())
        # AES-CBC-PAD round trip on the server
        iv = os.urandom(16)
        call(c, "C_EncryptInit", sess, Mechanism(CKM_AES_CBC_PAD, IvParams(iv)), aes)
        (ct,) = call(c, "C_Encrypt", sess, MSG, 256)
        assert ct != MSG and len(ct) % 16 == 0
        call(c, "C_DecryptInit", sess, Mechanism(CKM_AES_CBC_PAD, IvParams(iv)), aes)
        (pt,) = call(c, "C_Decrypt", sess, ct, 256)
        assert pt == MSG
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]
    assert USER_PIN not in gw.log()


def test_kmip_server_stopped_mid_loop_and_restarted(kmip_server: KmipServerProc,
                                                    tmp_path: Path) -> None:
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server, timeout=2.0, retries=1,
                                     retry_backoff=0.1, call_deadline=10.0))
    try:
        c, sess = session(gw)
        pub, priv = rsa_pair(c, sess, "loop-rsa")
        key = public_key(c, sess, pub)
        mech = Mechanism(CKM_SHA256_RSA, None)
        for _ in range(3):
            key.verify(sign(c, sess, priv, mech), MSG, padding.PKCS1v15(), hashes.SHA256())
        # a call in flight when the server dies: freeze the server, start the call,
        # kill the server under it
        assert kmip_server.proc is not None
        os.kill(kmip_server.proc.pid, signal.SIGSTOP)
        in_flight: dict[str, Any] = {}

        def one() -> None:
            call(c, "C_SignInit", sess, mech, priv)
            in_flight["rv"] = rv(c, "C_Sign", sess, MSG, 512)

        t = threading.Thread(target=one)
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # waiting on the frozen server
        # the event loop is not blocked by the hung KMIP call: another client is served
        other, osess = session(gw, login=False)
        t0 = time.monotonic()
        (opub,) = other.find(osess, [u(0x0, 2), s(CKA_LABEL, "loop-rsa")])
        assert public_key(other, osess, opub).public_numbers() == key.public_numbers()
        assert time.monotonic() - t0 < 1.0 and t.is_alive()
        other.close()
        kmip_server.stop()
        t.join(30)
        assert in_flight["rv"] == ckr.DEVICE_ERROR
        # while the server is down: prompt CKR_DEVICE_ERROR, the gateway stays up
        t0 = time.monotonic()
        call(c, "C_SignInit", sess, mech, priv)
        assert rv(c, "C_Sign", sess, MSG, 512) == ckr.DEVICE_ERROR
        assert time.monotonic() - t0 < 10
        # the answers from the identity map need no server
        assert public_key(c, sess, pub).public_numbers() == key.public_numbers()
        kmip_server.start()
        # the same client connection and session go on, with the same key
        for _ in range(3):
            key.verify(sign(c, sess, priv, mech), MSG, padding.PKCS1v15(), hashes.SHA256())
        c.close()
        errors = [r for r in gw.records() if r.get("msg") == "KMIP server unreachable"]
        assert errors
    finally:
        if kmip_server.proc is None:
            kmip_server.start()
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]


def test_keys_made_outside_the_gateway_are_found_by_kmip_name(
        kmip_server: KmipServerProc, tmp_path: Path) -> None:
    from kmip.core import enums

    k = kmip_server.client()
    try:
        masks = [enums.CryptographicUsageMask.SIGN, enums.CryptographicUsageMask.VERIFY]
        pub_uid, priv_uid = k.create_key_pair(
            enums.CryptographicAlgorithm.RSA, 2048, public_name="outside-rsa",
            private_name="outside-rsa", public_usage_mask=masks, private_usage_mask=masks)
        k.activate(pub_uid)
        k.activate(priv_uid)
    finally:
        k.close()
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    try:
        c, sess = session(gw)
        label = s(CKA_LABEL, "outside-rsa")
        assert c.find(sess, [u(0x0, 3), label]) != []
        (priv,) = c.find(sess, [u(0x0, 3), label])
        (pub,) = c.find(sess, [u(0x0, 2), label])
        key = public_key(c, sess, pub)
        key.verify(sign(c, sess, priv, Mechanism(CKM_SHA256_RSA, None)), MSG,
                   padding.PKCS1v15(), hashes.SHA256())
        _attrs, code = call(c, "C_GetAttributeValue", sess, priv,
                           [AttrRequest(CKA_PRIVATE_EXPONENT, 4096)])
        assert code == ckr.ATTRIBUTE_SENSITIVE
        bits, code = call(c, "C_GetAttributeValue", sess, priv,
                          [AttrRequest(CKA_MODULUS_BITS, 8)])
        assert code == ckr.OK and bits[0].value == 2048
        # found once: a second search maps nothing new
        assert sorted(c.find(sess, [label])) == sorted([pub, priv])
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]


def test_identity_map_write_fails_closed(kmip_server: KmipServerProc, tmp_path: Path) -> None:
    import sqlite3

    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server))
    db = tmp_path / "state" / "registry.sqlite3"  # the state store holds the map
    try:
        c, sess = session(gw)
        # a real SQLite failure on the next write of the map
        with sqlite3.connect(db) as con:
            con.execute("CREATE TRIGGER refuse BEFORE INSERT ON kmip_object "
                        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                  [u(CKA_MODULUS_BITS, 2048), s(CKA_LABEL, "unmapped")],
                  [s(CKA_LABEL, "unmapped")]) == ckr.DEVICE_ERROR
        with sqlite3.connect(db) as con:
            con.execute("DROP TRIGGER refuse")
            assert con.execute("SELECT count(*) FROM kmip_object").fetchone() == (0,)
        # the pair the server made is not lost: its KMIP Name finds it, once
        priv = c.find(sess, [u(0x0, 3), s(CKA_LABEL, "unmapped")])
        pub = c.find(sess, [u(0x0, 2), s(CKA_LABEL, "unmapped")])
        assert len(priv) == 1 and len(pub) == 1
        key = public_key(c, sess, pub[0])
        key.verify(sign(c, sess, priv[0], Mechanism(CKM_SHA256_RSA, None)), MSG,
                   padding.PKCS1v15(), hashes.SHA256())
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]
    assert any(r.get("msg") == "KMIP identity map failed" for r in gw.records())


def test_credential_password_read_at_connect(kmip_server: KmipServerProc,
                                             tmp_path: Path) -> None:
    secret = "kmip-credential-password-77"
    pw = tmp_path / "kmip.password"
    pw.write_text(secret + "\n")
    pw.chmod(0o600)
    gw = Gateway(kmip_gateway_config(tmp_path, kmip_server, username="p11gate",
                                     password_file=str(pw), retries=0))
    try:
        c, sess = session(gw)
        pw.unlink()  # unreadable when the first connection is made: a device error
        assert rv(c, "C_GenerateKeyPair", sess, Mechanism(CKM_RSA_KEYGEN, None),
                  [u(CKA_MODULUS_BITS, 2048)], []) == ckr.DEVICE_ERROR
        pw.write_text(secret + "\n")
        pub, priv = rsa_pair(c, sess, "with-credential")
        public_key(c, sess, pub).verify(
            sign(c, sess, priv, Mechanism(CKM_SHA256_RSA, None)), MSG, padding.PKCS1v15(),
            hashes.SHA256())
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]
    assert secret not in gw.log()

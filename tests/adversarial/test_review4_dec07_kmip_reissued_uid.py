"""A KMIP server that reissues a UID (fourth review): PyKMIP numbers objects 1, 2, ...,
so a server whose database is reset or restored from a backup gives a new object the
UID of one the gateway still maps. The identity map kept its row (ON CONFLICT DO
NOTHING): the new key got the old key's handle, so every handle a client held to the
old key (its label, its CKA_ID: its owner) now used the new one. A reissued UID now
replaces the stale row, with a new handle; the old handle names nothing."""

from __future__ import annotations

from pathlib import Path

from tests.adversarial.hostile import call, rv, s, u
from tests.gateway_proc import Gateway, RawClient
from tests.kmip_backend.conftest import kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc
from tests.kmip_backend.test_kmip_raw import CKA_LABEL, CKA_VALUE_LEN, CKM_AES_KEYGEN, session

from p11gate.codec import AttrRequest, Mechanism, ckr
from p11gate.codec.values import IvParams

CKM_AES_CBC_PAD = 0x1085


def _key(c: RawClient, sess: int, label: str) -> int:
    (h,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEYGEN, None),
                [u(CKA_VALUE_LEN, 16), s(CKA_LABEL, label)])
    return int(h)


def test_a_reissued_uid_does_not_rebind_an_old_handle(tmp_path: Path) -> None:
    (tmp_path / "kmip").mkdir()
    server = KmipServerProc(tmp_path / "kmip")
    server.start()
    gw = Gateway(kmip_gateway_config(tmp_path, server, retries=3, retry_backoff=0.2))
    try:
        c, sess = session(gw)
        old = _key(c, sess, "tenant-a-key")
        # the server's database is reset (or restored from before the key was made)
        server.stop()
        (server.dir / "kmip.db").unlink()
        server.start()
        # the pooled connection to the old server process fails once (not retried)
        gen = (Mechanism(CKM_AES_KEYGEN, None),
               [u(CKA_VALUE_LEN, 16), s(CKA_LABEL, "tenant-b-key")])
        assert rv(c, "C_GenerateKey", sess, *gen) == ckr.DEVICE_ERROR
        new = _key(c, sess, "tenant-b-key")
        assert new != old
        # the old handle is not the new key under the old key's name
        assert rv(c, "C_GetAttributeValue", sess, old,
                  [AttrRequest(CKA_LABEL, 64)]) == ckr.OBJECT_HANDLE_INVALID
        assert rv(c, "C_EncryptInit", sess, Mechanism(CKM_AES_CBC_PAD, IvParams(b"\0" * 16)),
                  old) == ckr.KEY_HANDLE_INVALID
        attrs, _ = call(c, "C_GetAttributeValue", sess, new, [AttrRequest(CKA_LABEL, 64)])
        assert attrs[0].value == b"tenant-b-key"
        # and a search by the old name finds no key
        assert c.find(sess, [s(CKA_LABEL, "tenant-a-key")]) == []
        c.close()
    finally:
        alive = gw.alive()
        gw.stop()
        server.stop()
        assert alive, gw.log()[-3000:]

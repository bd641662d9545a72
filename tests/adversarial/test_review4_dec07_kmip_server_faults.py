"""A KMIP server that misbehaves (fourth review): the gateway talks to a fake TLS peer
with the real test PKI (so the certificate and name checks pass) that answers with a
header announcing a huge message and then streams it, or trickles a reply one byte at a
time so that no single read ever times out. Before the fix PyKMIP read the whole
announced message (up to 4 GiB, copied again at every chunk) and a trickling server held
the connection's thread for ever, long after the client had its CKR_DEVICE_ERROR."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

from tests.adversarial.hostile import call, rv, s, u
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.kmip_backend.conftest import USER_PIN, kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc

from p11gate.codec import Mechanism, ckr
from p11gate.codec.tables import V026

CKA_LABEL, CKA_VALUE_LEN, CKM_AES_KEY_GEN = 0x3, 0x161, 0x1080
#: what the huge-length peer is willing to stream before it gives up
HUGE_BUDGET = 512 << 20


class FakeKmip:
    """A TLS peer on the KMIP port of ``pki`` (a KmipServerProc that is never started):
    it reads one request and answers it with ``behaviour``."""

    def __init__(self, pki: KmipServerProc, behaviour: str) -> None:
        self.behaviour = behaviour
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.dir / "server.pem", pki.dir / "server.key")
        ctx.load_verify_locations(pki.dir / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        pki.port = self.listener.getsockname()[1]
        self.sent = 0
        self.requests = 0
        self.closed_by_gateway = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            header = conn.recv(8)
            (length,) = struct.unpack("!I", header[4:8])
            got = len(header) - 8
            while got < length:
                got += len(conn.recv(length - got))
            self.requests += 1
            if self.behaviour == "huge":
                conn.sendall(bytes.fromhex("42007b01") + struct.pack("!I", 0xFFFFFFF0))
                chunk = b"\0" * (1 << 20)
                while self.sent < HUGE_BUDGET and not self.stop.is_set():
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            else:  # trickle: a byte at a time, each well inside the socket timeout
                reply = bytes.fromhex("42007b01") + struct.pack("!I", 1 << 16)
                for i in range(600):
                    if self.stop.is_set():
                        break
                    conn.sendall(reply[i:i + 1] if i < len(reply) else b"\0")
                    self.sent += 1
                    time.sleep(0.25)
            self.stop.wait()
        except (OSError, ssl.SSLError, struct.error):
            self.closed_by_gateway.set()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def _logged_in(gw: Gateway) -> tuple[RawClient, int]:
    c = RawClient(gw.path, version=2, dialect=V026, timeout=60)
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    (sess,) = call(c, "C_OpenSession", slots[0], 6)
    call(c, "C_Login", sess, 1, USER_PIN.encode())
    return c, sess


def _generate(c: RawClient, sess: int) -> int:
    return rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
              [u(CKA_VALUE_LEN, 16), s(CKA_LABEL, "fake")])


def _run(tmp_path: Path, behaviour: str, **kmip: Any) -> FakeKmip:
    (tmp_path / "pki").mkdir()
    pki = KmipServerProc(tmp_path / "pki")  # its certificates; the server never starts
    fake = FakeKmip(pki, behaviour)
    gw = Gateway(kmip_gateway_config(tmp_path, pki, retries=0, **kmip))
    try:
        c, sess = _logged_in(gw)
        assert _generate(c, sess) == ckr.DEVICE_ERROR
        assert fake.requests == 1
        # the gateway lets go of the connection: it does not read on
        assert wait_for(fake.closed_by_gateway.is_set, 120), (behaviour, fake.sent)
        # and the gateway still answers (the event loop was never the one waiting)
        assert rv(c, "C_GetSessionInfo", sess) == ckr.OK
        c.close()
    finally:
        fake.close()
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]
    return fake


def test_a_huge_announced_reply_is_not_read(tmp_path: Path) -> None:
    fake = _run(tmp_path, "huge", timeout=5.0, call_deadline=20.0)
    # the header's 4 GiB were refused at once, not read up to the peer's budget
    assert fake.sent < HUGE_BUDGET, fake.sent


def test_a_trickling_reply_ends_at_the_call_deadline(tmp_path: Path) -> None:
    fake = _run(tmp_path, "trickle", timeout=2.0, call_deadline=4.0)
    assert fake.sent < 600, fake.sent

"""`p11gate worker` spoken to over a socketpair with the codec, against SoftHSMv2.

The same conversation also runs against `p11-kit remote` (the drop-in replacement the
gateway may use instead), which pins down that both behave alike on the wire.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tests.softhsm import make_token, requires_softhsm

from p11gate.codec import (
    HANDSHAKE,
    V026,
    Attribute,
    AttrRequest,
    Dialect,
    FrameReader,
    Mechanism,
    Null,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    dialect_for_version,
    encode_request,
)

pytestmark = requires_softhsm

C_Initialize, C_Finalize, C_GetInfo, C_GetSlotList, C_GetTokenInfo = 1, 2, 3, 4, 6
C_OpenSession, C_Login = 10, 18
C_GetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 24, 26, 27, 28
C_SignInit, C_Sign, C_GenerateRandom, C_LoginUser = 42, 43, 64, 66
CKA_CLASS, CKA_LABEL, CKA_EC_POINT = 0x0, 0x3, 0x181
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKM_ECDSA = 0x1041

WORKER = [sys.executable, "-m", "p11gate.cli", "worker"]
P11KIT_REMOTE = ["p11-kit", "remote"]


class Peer:
    """The client half of the protocol over a socketpair to a worker process."""

    def __init__(self, cmd: list[str], env: dict[str, str], separate_fds: bool = False) -> None:
        if separate_fds:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self._send = self.proc.stdin.write
            self._flush = self.proc.stdin.flush
            self._recv = self.proc.stdout.read1
            self.sock = None
        else:
            self.sock, child = socket.socketpair()
            self.sock.settimeout(30)
            self.proc = subprocess.Popen(cmd, env=env, stdin=child.fileno(), stdout=child.fileno())
            child.close()
            self._send = self.sock.sendall
            self._flush = lambda: None
            self._recv = self.sock.recv
        self.reader = FrameReader()
        self.frames: dict[int, bytes] = {}
        self.code = 0x10
        self.dialect: Dialect = V026

    def handshake(self, offer: int = 2) -> int:
        self._send(bytes([offer]))
        self._flush()
        answer = self._recv(1)
        assert len(answer) == 1
        self.dialect = dialect_for_version(answer[0])
        return answer[0]

    def send(self, call_id: int, args: list[Any]) -> int:
        self.code += 1
        self.send_raw(self.code, encode_request(call_id, args, self.dialect))
        return self.code

    def send_raw(self, code: int, body: bytes) -> None:
        self._send(build_frame(code, body, b"client"))
        self._flush()

    def receive(self, code: int) -> bytes:
        while code not in self.frames:
            data = self._recv(65536)
            if not data:
                raise EOFError("worker closed the connection")
            for f in list(self.reader.feed(data)):
                self.frames[f.code] = f.body
        return self.frames.pop(code)

    def call(self, call_id: int, args: list[Any]) -> list[Any]:
        body = self.receive(self.send(call_id, args))
        return decode_reply(body, self.dialect, call_id, args)

    def close(self) -> int:
        if self.sock is not None:
            self.sock.close()
        elif self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm"))


SERVERS = ["worker"] + (["p11-kit"] if shutil.which("p11-kit") else [])


@pytest.fixture(params=SERVERS)
def server_cmd(request: pytest.FixtureRequest, token: dict[str, Any]) -> list[str]:
    base = WORKER if request.param == "worker" else P11KIT_REMOTE
    return [*base, token["module"]]


@pytest.fixture
def worker_cmd(token: dict[str, Any]) -> list[str]:
    return [*WORKER, token["module"]]


@pytest.fixture
def peer(server_cmd: list[str], token: dict[str, Any]) -> Iterator[Peer]:
    p = Peer(server_cmd, token["env"])
    yield p
    p.close()


def start(p: Peer) -> None:
    p.handshake()
    assert p.call(C_Initialize, [HANDSHAKE, 0, b"\0"]) == []


def login_session(p: Peer, token: dict[str, Any]) -> int:
    """A new R/W session on the token, logged in (login is per application)."""
    (slots,) = p.call(C_GetSlotList, [1, 8])
    for slot in slots:
        if p.call(C_GetTokenInfo, [slot])[0].rstrip() == token["label"].encode():
            (session,) = p.call(C_OpenSession, [slot, 6])
            try:
                p.call(C_Login, [session, 1, token["pin"].encode()])
            except ReplyError as e:
                if e.rv != ckr.USER_ALREADY_LOGGED_IN:
                    raise
            return int(session)
    raise AssertionError("token not found")


def find_one(p: Peer, session: int, cls: int, label: bytes) -> int:
    template = [Attribute(CKA_CLASS, cls, 8), Attribute(CKA_LABEL, label, len(label))]
    p.call(C_FindObjectsInit, [session, template])
    (handles,) = p.call(C_FindObjects, [session, 10])
    p.call(C_FindObjectsFinal, [session])
    assert len(handles) == 1
    return int(handles[0])


# ------------------------------------------------------------------ both servers


def test_handshake_and_info(peer: Peer, server_cmd: list[str]) -> None:
    answer = peer.handshake(2)
    assert answer == (2 if server_cmd[0] == sys.executable else 0)  # p11-kit 0.24.1 says 0
    assert peer.call(C_Initialize, [HANDSHAKE, 0, b"\0"]) == []
    version, manufacturer, _, _, _ = peer.call(C_GetInfo, [])
    assert version == (2, 40) and manufacturer.startswith(b"SoftHSM")
    assert peer.call(C_Finalize, []) == []


def test_sign(peer: Peer, token: dict[str, Any]) -> None:
    start(peer)
    session = login_session(peer, token)
    priv = find_one(peer, session, CKO_PRIVATE_KEY, b"ec1")
    pub = find_one(peer, session, CKO_PUBLIC_KEY, b"ec1")
    digest = hashlib.sha256(b"over the wire").digest()
    assert peer.call(C_SignInit, [session, Mechanism(CKM_ECDSA), priv]) == []
    assert peer.call(C_Sign, [session, digest, 0]) == [Null(64)]
    (sig,) = peer.call(C_Sign, [session, digest, 64])
    assert len(sig) == 64
    (attrs, rv) = peer.call(C_GetAttributeValue, [session, pub, [AttrRequest(CKA_EC_POINT, 100)]])
    assert rv == ckr.OK
    point = attrs[0].value[2:]
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, b"over the wire", ec.ECDSA(hashes.SHA256()))


def test_errors_are_error_replies(peer: Peer, token: dict[str, Any]) -> None:
    start(peer)
    session = login_session(peer, token)
    with pytest.raises(ReplyError) as e:
        peer.call(C_Sign, [session, b"x", 64])
    assert e.value.rv == ckr.OPERATION_NOT_INITIALIZED
    with pytest.raises(ReplyError) as e:
        peer.call(C_GetAttributeValue, [session, 0xDEAD, [AttrRequest(CKA_LABEL, 0)]])
    assert e.value.rv == ckr.OBJECT_HANDLE_INVALID


def test_pipelined_requests_all_answered(peer: Peer, token: dict[str, Any]) -> None:
    start(peer)
    sessions = [login_session(peer, token) for _ in range(4)]
    codes = {}
    batch = b""
    for i in range(200):
        peer.code += 1
        args = [sessions[i % 4], 16 + i % 17]
        codes[peer.code] = args
        batch += build_frame(peer.code, encode_request(C_GenerateRandom, args, peer.dialect))
    peer._send(batch)  # all at once: the worker may answer them in any order
    peer._flush()
    for code, args in codes.items():
        (data,) = decode_reply(peer.receive(code), peer.dialect, C_GenerateRandom, args)
        assert len(data) == args[1]
    assert not peer.frames


def test_eof_ends_the_worker_cleanly(server_cmd: list[str], token: dict[str, Any]) -> None:
    p = Peer(server_cmd, token["env"])
    start(p)
    assert p.close() == 0


# ------------------------------------------------------------------ p11gate worker only


def test_version_answer(worker_cmd: list[str], token: dict[str, Any]) -> None:
    for offer, answer in ((0, 0), (1, 1), (2, 2), (255, 2)):
        p = Peer(worker_cmd, token["env"])
        assert p.handshake(offer) == answer
        assert p.call(C_Initialize, [HANDSHAKE, 0, b"\0"]) == []
        assert p.call(C_GetInfo, [])[0] == (2, 40)
        assert p.close() == 0


def test_initialize(worker_cmd: list[str], token: dict[str, Any]) -> None:
    p = Peer(worker_cmd, token["env"])
    p.handshake()
    with pytest.raises(ReplyError) as e:
        p.call(C_Initialize, [b"NOT-THE-HANDSHAKE", 0, b"\0"])
    assert e.value.rv == ckr.GENERAL_ERROR
    assert p.call(C_Initialize, [HANDSHAKE, 0, b"\0"]) == []
    assert p.call(C_Initialize, [HANDSHAKE, 0, b"\0"]) == []  # the module is initialized once
    assert p.call(C_Finalize, []) == []
    assert p.call(C_GetInfo, [])[0] == (2, 40)  # still serving: finalized at exit
    assert p.close() == 0


def test_init_reserved_reaches_the_module(worker_cmd: list[str], token: dict[str, Any]) -> None:
    # SoftHSM insists on pReserved == NULL, so a reserved string shows up as its refusal
    p = Peer([*worker_cmd, "--init-reserved", "hello"], token["env"])
    p.handshake()
    with pytest.raises(ReplyError) as e:
        p.call(C_Initialize, [HANDSHAKE, 0, b"\0"])
    assert e.value.rv == ckr.ARGUMENTS_BAD
    p.close()
    p = Peer(worker_cmd, token["env"])
    p.handshake()
    with pytest.raises(ReplyError) as e:
        p.call(C_Initialize, [HANDSHAKE, 1, b"from-client\0"])  # the client's string
    assert e.value.rv == ckr.ARGUMENTS_BAD
    p.close()


def test_pkcs11_3_call_not_supported(worker_cmd: list[str], token: dict[str, Any]) -> None:
    p = Peer(worker_cmd, token["env"])
    start(p)
    session = login_session(p, token)
    with pytest.raises(ReplyError) as e:
        p.call(C_LoginUser, [session, 1, b"1234", b"user"])
    assert e.value.rv == ckr.FUNCTION_NOT_SUPPORTED
    p.close()


def test_separate_stdin_stdout(worker_cmd: list[str], token: dict[str, Any]) -> None:
    p = Peer(worker_cmd, token["env"], separate_fds=True)
    start(p)
    session = login_session(p, token)
    (data,) = p.call(C_GenerateRandom, [session, 64])
    assert len(data) == 64
    assert p.close() == 0


def test_large_reply(worker_cmd: list[str], token: dict[str, Any]) -> None:
    # bigger than a socket buffer: the write must cope with a non-blocking socket
    p = Peer(worker_cmd, token["env"])
    start(p)
    session = login_session(p, token)
    code = p.send(C_GenerateRandom, [session, 4 * 1024 * 1024])
    (data,) = decode_reply(p.receive(code), p.dialect, C_GenerateRandom, [session, 4 << 20])
    assert len(data) == 4 * 1024 * 1024
    assert p.close() == 0


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x03\x00\x00\x00\x03xyz",  # C_GetInfo with a wrong signature
        b"\x00\x00\x00\x5a\x00\x00\x00\x00",  # call id 90
        b"\x00\x00",  # truncated
    ],
)
def test_bad_frames_close_with_error(
    worker_cmd: list[str], token: dict[str, Any], body: bytes
) -> None:
    p = Peer(worker_cmd, token["env"])
    start(p)
    p.send_raw(0x99, body)
    with pytest.raises(EOFError):
        p.receive(0x99)
    assert p.close() != 0


def test_eof_inside_a_frame(worker_cmd: list[str], token: dict[str, Any]) -> None:
    p = Peer(worker_cmd, token["env"])
    start(p)
    p._send(build_frame(0x99, encode_request(C_GetInfo, [], p.dialect))[:7])
    assert p.close() != 0

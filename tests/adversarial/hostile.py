"""What a hostile client needs: raw calls by name, pipelined frames, attribute builders.

Everything here speaks the p11-kit RPC protocol directly (no p11-kit-client.so, which
checks some things on the client side): the gateway must make every check itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.gateway_proc import Gateway, RawClient

from p11gate.codec import (
    Attribute,
    Mechanism,
    ReplyError,
    build_frame,
    ckr,
    decode_reply,
    dialect_for_version,
    encode_request,
)
from p11gate.codec.calls import CALLS_BY_NAME

CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_VALUE, CKA_KEY_TYPE, CKA_ID, CKA_ENCRYPT = 0x11, 0x100, 0x102, 0x104
CKA_SIGN, CKA_VALUE_LEN, CKA_SENSITIVE, CKA_EXTRACTABLE = 0x108, 0x161, 0x103, 0x162
CKA_VERIFY, CKA_EC_PARAMS, CKA_ALWAYS_AUTHENTICATE = 0x10A, 0x180, 0x202
CKO_DATA, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY = 0, 2, 3, 4
CKK_AES = 0x1F
CKM_AES_KEY_GEN, CKM_AES_ECB, CKM_ECDSA, CKM_SHA256 = 0x1080, 0x1081, 0x1041, 0x250
CKM_EC_KEY_PAIR_GEN = 0x1040
CKU_SO, CKU_USER = 0, 1
CKF_RW, CKF_SERIAL = 2, 4
CKS_RO_PUBLIC, CKS_RW_PUBLIC, CKS_RO_USER = 0, 2, 1
#: CKA_EC_PARAMS of P-256 (the OID of prime256v1)
P256 = bytes.fromhex("06082a8648ce3d030107")


def ID(name: str) -> int:
    return CALLS_BY_NAME[name].id


def b(kind: int, value: bool) -> Attribute:
    return Attribute(kind, int(value), 1)


def u(kind: int, value: int) -> Attribute:
    return Attribute(kind, value, 8)


def s(kind: int, value: bytes | str) -> Attribute:
    v = value.encode() if isinstance(value, str) else value
    return Attribute(kind, v, len(v))


def call(c: RawClient, name: str, *args: Any) -> list[Any]:
    return c.call(ID(name), list(args))


def rv(c: RawClient, name: str, *args: Any) -> int:
    """The CK_RV of one call (0 = CKR_OK)."""
    try:
        c.call(ID(name), list(args))
    except ReplyError as e:
        return e.rv
    return 0


def send(c: RawClient, name: str, *args: Any) -> tuple[int, int, list[Any]]:
    """Send one request without waiting for its reply (see :func:`answer`)."""
    c.code += 1
    c.send_raw(build_frame(c.code, encode_request(ID(name), list(args), c.dialect),
                           b"client"))
    return c.code, ID(name), list(args)


def answer(c: RawClient, sent: tuple[int, int, list[Any]]) -> int:
    """The CK_RV of the reply to a request made with :func:`send` (the next frame)."""
    frame = c.recv_frame()
    assert frame is not None and frame[0] == sent[0], "no reply, or another call's"
    try:
        decode_reply(frame[1], c.dialect, sent[1], sent[2])
    except ReplyError as e:
        return e.rv
    return 0


def pipeline(c: RawClient, requests: list[tuple[str, list[Any]]]) -> list[int]:
    """Send every request before reading any reply; the CK_RV of each, in request order
    (replies are matched by call code, as p11-kit clients do)."""
    codes: dict[int, tuple[int, list[Any]]] = {}
    data = bytearray()
    for name, args in requests:
        c.code += 1
        codes[c.code] = (ID(name), args)
        data += build_frame(c.code, encode_request(ID(name), args, c.dialect), b"client")
    c.send_raw(bytes(data))
    out: dict[int, int] = {}
    while len(out) < len(codes):
        frame = c.recv_frame()
        assert frame is not None, "gateway closed the connection"
        cid, args = codes[frame[0]]
        try:
            decode_reply(frame[1], c.dialect, cid, args)
            out[frame[0]] = 0
        except ReplyError as e:
            out[frame[0]] = e.rv
    return [out[k] for k in sorted(codes)]


def aes_template(label: str | None, cka_id: bytes, token: bool = True) -> list[Attribute]:
    """An AES-128 key's template; ``label`` None: the key has no CKA_LABEL."""
    return [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, token),
            *([] if label is None else [s(CKA_LABEL, label)]), s(CKA_ID, cka_id),
            u(CKA_VALUE_LEN, 16), b(CKA_ENCRYPT, True)]


def session_ec_key_pair(c: RawClient, session: int, *private: Attribute) -> int:
    """A session P-256 key pair made on ``session``: the handle of its private key (a
    private signing key, with ``private`` added to its template)."""
    pub = [s(CKA_EC_PARAMS, P256), b(CKA_TOKEN, False), b(CKA_VERIFY, True)]
    priv = [b(CKA_TOKEN, False), b(CKA_PRIVATE, True), b(CKA_SIGN, True), *private]
    _pub, key = call(c, "C_GenerateKeyPair", session, Mechanism(CKM_EC_KEY_PAIR_GEN, None),
                     pub, priv)
    return int(key)


def stop_gateway(g: Gateway, *then: Callable[[], object]) -> None:
    """The end of a module's gateway fixture: stop it, run the clean-ups ``then``, and
    fail if it had died during the tests (the tail of its log as the message)."""
    alive = g.alive()
    g.stop()
    for clean_up in then:
        clean_up()
    assert alive, f"gateway died:\n{g.log()[-3000:]}"


def logged_in(gw: Gateway, version: int = 0) -> tuple[RawClient, int]:
    """A raw client of ``gw`` (protocol ``version``) with a read-write session on the
    first slot, logged in as the user (PIN 1234; already logged in through another
    connection is as good)."""
    c = RawClient(gw.path, version, dialect_for_version(version))
    c.initialize()
    (slots,) = call(c, "C_GetSlotList", 1, 8)
    (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
    assert rv(c, "C_Login", sess, CKU_USER, b"1234") in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN)
    return c, sess

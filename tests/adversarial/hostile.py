"""What a hostile client needs: raw calls by name, pipelined frames, attribute builders.

Everything here speaks the p11-kit RPC protocol directly (no p11-kit-client.so, which
checks some things on the client side): the gateway must make every check itself.
"""

from __future__ import annotations

from typing import Any

from tests.gateway_proc import RawClient

from p11gate.codec import Attribute, ReplyError, build_frame, decode_reply, encode_request
from p11gate.codec.calls import CALLS_BY_NAME

CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_VALUE, CKA_KEY_TYPE, CKA_ID, CKA_ENCRYPT = 0x11, 0x100, 0x102, 0x104
CKA_SIGN, CKA_VALUE_LEN, CKA_SENSITIVE, CKA_EXTRACTABLE = 0x108, 0x161, 0x103, 0x162
CKO_DATA, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY = 0, 2, 3, 4
CKK_AES = 0x1F
CKM_AES_KEY_GEN, CKM_AES_ECB, CKM_ECDSA, CKM_SHA256 = 0x1080, 0x1081, 0x1041, 0x250
CKU_SO, CKU_USER = 0, 1
CKF_RW, CKF_SERIAL = 2, 4
CKS_RO_PUBLIC, CKS_RW_PUBLIC, CKS_RO_USER = 0, 2, 1


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


def aes_template(label: str, cka_id: bytes, token: bool = True) -> list[Attribute]:
    return [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, token),
            s(CKA_LABEL, label), s(CKA_ID, cka_id), u(CKA_VALUE_LEN, 16),
            b(CKA_ENCRYPT, True)]

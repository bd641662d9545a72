"""A logged-in session on a SoftBackend with one-line calls for the mechanism tests."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from tests.soft.helpers import USER_PIN, Driver

from p11gate.backends.soft.objects import BOOL_ATTRS
from p11gate.codec.values import Attribute, AttrRequest, Mechanism

CKO_PUBLIC, CKO_PRIVATE, CKO_SECRET = 2, 3, 4
CKK_RSA, CKK_EC, CKK_GENERIC, CKK_AES, CKK_EDWARDS = 0x0, 0x3, 0x10, 0x1F, 0x40
P256 = bytes.fromhex("06082a8648ce3d030107")
P384 = bytes.fromhex("06052b81040022")
P521 = bytes.fromhex("06052b81040023")
ED25519_OID, ED448_OID = bytes.fromhex("06032b6570"), bytes.fromhex("06032b6571")


def A(t: int, v: int | bytes) -> Attribute:
    if isinstance(v, int):
        return Attribute(t, v, 1 if t in BOOL_ATTRS else 8)
    return Attribute(t, v, len(v))


class Tok:
    def __init__(self, d: Driver) -> None:
        self.d = d
        (self.s,) = d("C_OpenSession", 1, 6)
        d("C_Login", self.s, 1, USER_PIN)

    def rv(self, name: str, *args: Any) -> int:
        return self.d.rv(name, self.s, *args)

    def __call__(self, name: str, *args: Any) -> list[Any]:
        return self.d(name, self.s, *args)

    def attr(self, h: int, t: int) -> Any:
        attrs, rv = self("C_GetAttributeValue", h, [AttrRequest(t, 4096)])
        assert rv == 0
        return attrs[0].value

    def pair(self, mech: int, pub: list[Attribute], priv: list[Attribute] = ()  # type: ignore[assignment]
             ) -> tuple[int, int]:
        pub_h, priv_h = self("C_GenerateKeyPair", Mechanism(mech), [A(0x10A, 1), A(0x104, 1),
                             A(0x106, 1), *pub],
                             [A(0x108, 1), A(0x105, 1), A(0x107, 1), A(0x10C, 1), *priv])
        return pub_h, priv_h

    def rsa(self, bits: int = 2048) -> tuple[int, int, rsa.RSAPublicKey]:
        pub, priv = self.pair(0x0, [A(0x121, bits)])
        n = int.from_bytes(self.attr(pub, 0x120), "big")
        e = int.from_bytes(self.attr(pub, 0x122), "big")
        return pub, priv, rsa.RSAPublicNumbers(e, n).public_key()

    def secret(self, value: bytes, kt: int = CKK_AES, **flags: int) -> int:
        attrs = [A(0, CKO_SECRET), A(0x100, kt), A(0x11, value)]
        names = {"encrypt": 0x104, "decrypt": 0x105, "wrap": 0x106, "unwrap": 0x107,
                 "sign": 0x108, "verify": 0x10A, "extractable": 0x162, "derive": 0x10C,
                 "trusted": 0x86, "wrap_with_trusted": 0x210}
        base = {"encrypt": 1, "decrypt": 1, "sign": 1, "verify": 1}
        for k, v in (base | flags).items():
            attrs.append(A(names[k], v))
        (h,) = self("C_CreateObject", attrs)
        return int(h)

    def sign(self, mech: int, key: int, data: bytes, param: Any = None,
             parts: int = 1) -> bytes:
        self("C_SignInit", Mechanism(mech, param), key)
        if parts == 1:
            (sig,) = self("C_Sign", data, 4096)
            return bytes(sig)
        step = max(1, len(data) // parts)
        for i in range(0, len(data), step):
            self("C_SignUpdate", data[i:i + step])
        (sig,) = self("C_SignFinal", 4096)
        return bytes(sig)

    def verify_rv(self, mech: int, key: int, data: bytes, sig: bytes, param: Any = None) -> int:
        rv = self.rv("C_VerifyInit", Mechanism(mech, param), key)
        return rv or self.rv("C_Verify", data, sig)

    def crypt(self, kind: str, mech: int, key: int, data: bytes, param: Any = None,
              parts: int = 1) -> bytes:
        self(f"C_{kind}Init", Mechanism(mech, param), key)
        if parts == 1:
            (out,) = self(f"C_{kind}", data, len(data) + 4096)
            return bytes(out)
        step = max(1, len(data) // parts)
        got = b""
        for i in range(0, len(data), step):
            (o,) = self(f"C_{kind}Update", data[i:i + step], len(data) + 4096)
            got += bytes(o) if isinstance(o, bytes) else b""
        (o,) = self(f"C_{kind}Final", 4096)
        return got + (bytes(o) if isinstance(o, bytes) else b"")

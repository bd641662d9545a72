"""A key-aware stateful fuzzer of raw frames: real keys of every family, mechanisms of
each family with crafted typed parameters, operations started, continued and ended with
odd data sizes and capacities, on one session, in random order (so operations are left
active, refused, half-done). It found three ways to crash SoftHSM behind the gateway
(templates without values, keys of another family, raw RSA past the modulus)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.gateway_proc import RawClient

from p11gate.codec import ArgumentError, Attribute, Mechanism, ReplyError, encode_request
from p11gate.codec import constants as ck
from p11gate.codec import values as v

Param = Callable[[random.Random], Any]
HASHES = [ck.CKM_SHA_1, ck.CKM_SHA256, ck.CKM_SHA512, ck.CKM_MD5, 0, 0xFFFFFFFF]


def _ul(r: random.Random) -> int:
    return r.choice([0, 1, 8, 12, 16, 32, 64, 96, 104, 128, 129, 256, 0x7FFFFFFF,
                     0xFFFFFFFF, r.getrandbits(64)])


def _bytes(r: random.Random) -> bytes | None:
    return r.choice([None, b"", r.randbytes(r.choice([1, 8, 12, 16, 17, 32, 65, 300]))])


FAMILIES: dict[str, list[tuple[int, Param]]] = {
    "rsa": [(ck.CKM_RSA_PKCS, lambda r: None), (ck.CKM_RSA_X_509, lambda r: None),
            (ck.CKM_SHA256_RSA_PKCS, lambda r: None),
            (ck.CKM_RSA_PKCS_PSS, lambda r: v.PssParams(r.choice(HASHES),
                                                        r.choice([1, 2, 0, 99]), _ul(r))),
            (ck.CKM_RSA_PKCS_OAEP, lambda r: v.OaepParams(r.choice(HASHES),
                                                          r.choice([1, 2, 0]),
                                                          r.choice([0, 1]), _bytes(r)))],
    "ec": [(ck.CKM_ECDSA, lambda r: None), (ck.CKM_ECDSA_SHA256, lambda r: None),
           (ck.CKM_ECDH1_DERIVE, lambda r: v.Ecdh1Params(
               r.choice([1, 2, 5, 99]), _bytes(r),
               r.choice([_bytes(r), b"\x04" + r.randbytes(64)])))],
    "aes": [(ck.CKM_AES_ECB, lambda r: None),
            (ck.CKM_AES_CBC, lambda r: v.IvParams(r.choice([r.randbytes(16), _bytes(r)]))),
            (ck.CKM_AES_CBC_PAD, lambda r: v.IvParams(r.choice([r.randbytes(16), None]))),
            (ck.CKM_AES_CTR, lambda r: v.CtrParams(_ul(r), r.choice([r.randbytes(16),
                                                                    _bytes(r)]))),
            (ck.CKM_AES_GCM, lambda r: v.GcmParams(_bytes(r), _ul(r), _bytes(r), _ul(r))),
            (ck.CKM_AES_CMAC, lambda r: None),
            (ck.CKM_AES_KEY_WRAP, lambda r: r.choice([None, r.randbytes(8)])),
            (ck.CKM_AES_ECB_ENCRYPT_DATA, lambda r: r.choice([r.randbytes(16), None]))],
    "hmac": [(ck.CKM_SHA256_HMAC, lambda r: None), (ck.CKM_SHA_1_HMAC, lambda r: None),
             (ck.CKM_SHA256_HMAC_GENERAL, lambda r: v.UlongParam(_ul(r)))],
}
#: operation → (init, single-part, update, final) call ids
OPERATIONS = {"encrypt": (29, 30, 31, 32), "decrypt": (33, 34, 35, 36),
              "sign": (42, 43, 44, 45), "verify": (48, 49, 50, 51)}
ENDS = ((32, 0xFFFFFFFF), (36, 0xFFFFFFFF), (45, 0xFFFFFFFF), (51, b""))


def a(kind: int, value: Any, length: int) -> Attribute:
    return Attribute(kind, value, length)


def make_keys(c: RawClient, s: int) -> dict[str, list[int]]:
    """One key (pair) of each family, allowed every use."""
    on = [a(k, 1, 1) for k in (ck.CKA_SIGN, ck.CKA_VERIFY, ck.CKA_ENCRYPT, ck.CKA_DECRYPT,
                               ck.CKA_WRAP, ck.CKA_UNWRAP, ck.CKA_DERIVE)]
    pub_on = [x for x in on if x.type in (ck.CKA_VERIFY, ck.CKA_ENCRYPT, ck.CKA_WRAP)]
    priv_on = [x for x in on if x.type in (ck.CKA_SIGN, ck.CKA_DECRYPT, ck.CKA_UNWRAP,
                                           ck.CKA_DERIVE)]
    session = [a(ck.CKA_TOKEN, 0, 1)]
    ec = c.call(59, [s, Mechanism(ck.CKM_EC_KEY_PAIR_GEN, None),
                     [a(ck.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"), 10),
                      *session, *pub_on], [*session, *priv_on]])
    rsa = c.call(59, [s, Mechanism(ck.CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                      [a(ck.CKA_MODULUS_BITS, 1024, 8), *session, *pub_on],
                      [*session, *priv_on]])
    (aes,) = c.call(58, [s, Mechanism(ck.CKM_AES_KEY_GEN, None),
                         [a(ck.CKA_VALUE_LEN, 32, 8), *session, *on]])
    (hmac,) = c.call(58, [s, Mechanism(ck.CKM_GENERIC_SECRET_KEY_GEN, None),
                          [a(ck.CKA_VALUE_LEN, 32, 8), *session, *on]])
    return {"rsa": list(rsa), "ec": list(ec), "aes": [aes], "hmac": [hmac]}


class Fuzzer:
    def __init__(self, c: RawClient, session: int, seed: int) -> None:
        self.c, self.s, self.r = c, session, random.Random(seed)
        self.keys = make_keys(c, session)
        self.all_keys = [k for ks in self.keys.values() for k in ks]
        self.outcomes: Counter[tuple[int, int, int]] = Counter()

    def _data(self) -> bytes:
        return self.r.randbytes(self.r.choice([0, 1, 16, 17, 32, 64, 127, 128, 129, 256,
                                               400, 4096]))

    def _cap(self) -> int:
        return self.r.choice([0, 1, 16, 128, 512, 4096, 0xFFFFFFFF])

    def sequence(self) -> list[tuple[int, list[Any]]]:
        r, s = self.r, self.s
        family = r.choice(list(FAMILIES))
        mtype, param = r.choice(FAMILIES[family])
        mech = Mechanism(mtype, param(r))
        key = r.choice(self.keys[family] if r.random() < 0.8 else self.all_keys)
        kind = r.choice([*OPERATIONS, "wrap", "unwrap", "derive"])
        secret = [a(ck.CKA_CLASS, ck.CKO_SECRET_KEY, 8), a(ck.CKA_TOKEN, 0, 1),
                  a(ck.CKA_KEY_TYPE, r.choice([ck.CKK_AES, ck.CKK_GENERIC_SECRET]), 8),
                  *([a(ck.CKA_VALUE_LEN, _ul(r), 8)] if r.random() < 0.5 else [])]
        if kind == "wrap":
            return [(60, [s, mech, key, r.choice(self.all_keys), self._cap()])]
        if kind == "unwrap":
            return [(61, [s, mech, key, self._data(), secret])]
        if kind == "derive":
            return [(62, [s, mech, key, secret])]
        init, one, update, final = OPERATIONS[kind]
        out: list[tuple[int, list[Any]]] = [(init, [s, mech, key])]
        if r.random() < 0.5:
            out.append((one, [s, self._data(), self._data()] if kind == "verify"
                        else [s, self._data(), self._cap()]))
        else:
            for _ in range(r.randrange(1, 3)):
                out.append((update, [s, self._data(), self._cap()]
                            if kind in ("encrypt", "decrypt") else [s, self._data()]))
            out.append((final, [s, self._data()] if kind == "verify" else [s, self._cap()]))
        return out

    def run(self, calls: int) -> None:
        done = 0
        while done < calls:
            for cid, args in self.sequence():
                try:
                    encode_request(cid, args, self.c.dialect)
                except ArgumentError:
                    break
                try:
                    self.c.call(cid, args)
                    rv = 0
                except ReplyError as e:
                    rv = e.rv
                self.outcomes[(cid, args[1].type if isinstance(args[1], Mechanism) else 0,
                               rv)] += 1
                done += 1
            if self.r.random() < 0.7:  # often end what is active; sometimes leave it
                for cid, last in ENDS:
                    try:
                        self.c.call(cid, [self.s, last])
                    except ReplyError:
                        pass

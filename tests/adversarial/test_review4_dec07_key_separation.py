"""``[[token]] key_separation = true``: a tenant cannot bring a sensitive key's value out
by any sequence of calls (frontend/key_separation.py).

Each attack is first run against the same kind of token *without* the option, where it
gives the attacker the value of a sensitive key it made from a known value (so that
the test can compare): the attacks are real on SoftHSM, and each refusal below is what
stops one. Raw frames, a real gateway over real SoftHSM."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import keywrap
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_ENCRYPT,
    CKA_EXTRACTABLE,
    CKA_KEY_TYPE,
    CKA_SENSITIVE,
    CKA_TOKEN,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKK_AES,
    CKM_AES_ECB,
    CKM_AES_KEY_GEN,
    CKO_SECRET_KEY,
    b,
    call,
    logged_in,
    rv,
    s,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, RawClient, write_config
from tests.softhsm import make_token

from p11gate.codec import Attribute, AttrRequest, Mechanism, ckr

CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_LOCAL = 0x105, 0x106, 0x107, 0x163
CKA_MODULUS_BITS = 0x121
CKM_AES_KEY_WRAP, CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS = 0x2109, 0x0, 0x1
CKM_XOR_BASE_AND_DATA = 0x364
SECRET = bytes(range(100, 132))  # the sensitive key's value (the test made it)
KNOWN_KEK = bytes(range(32))  # a wrapping key's value the attacker chose
WRAP = Mechanism(CKM_AES_KEY_WRAP, None)


class Separated(Gateway):
    """A gateway over a fresh SoftHSM token, with or without key_separation."""

    def __init__(self, base: Path, separated: bool) -> None:
        cfg = write_config(base, make_token(base / "hsm", keys=False))
        if separated:  # [[token]] is the configuration's last table
            cfg.write_text(cfg.read_text() + "key_separation = true\n")
        super().__init__(cfg)
        self.separated = separated


@pytest.fixture(scope="module", params=[False, True], ids=["off", "on"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[Separated]:
    g = Separated(tmp_path_factory.mktemp(f"ksep-{request.param}"), request.param)
    yield g
    stop_gateway(g)


@pytest.fixture()
def c(gw: Gateway) -> Iterator[tuple[RawClient, int]]:
    client, sess = logged_in(gw)
    yield client, sess
    client.close()


def aes(*roles: tuple[int, bool], value: bytes | None = None) -> list[Attribute]:
    base = [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, False),
            *(b(kind, on) for kind, on in roles)]
    return [*base, s(CKA_VALUE, value)] if value is not None else [*base,
                                                                   u(CKA_VALUE_LEN, 32)]


def generate(client: RawClient, sess: int, *roles: tuple[int, bool]) -> int:
    """A session AES key made on the token: sensitive unless ``roles`` say otherwise."""
    if CKA_SENSITIVE not in dict(roles):
        roles = (*roles, (CKA_SENSITIVE, True))
    (key,) = call(client, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None),
                  aes(*roles))
    return int(key)


def sensitive_target(client: RawClient, sess: int) -> int:
    (key,) = call(client, "C_CreateObject", sess, aes(
        (CKA_SENSITIVE, True), (CKA_EXTRACTABLE, True), (CKA_ENCRYPT, True),
        value=SECRET))
    return int(key)


def ecb_decrypt(client: RawClient, sess: int, key: int, data: bytes) -> bytes:
    call(client, "C_DecryptInit", sess, Mechanism(CKM_AES_ECB, None), key)
    (out,) = call(client, "C_Decrypt", sess, data, len(data))
    return bytes(out)


def rfc3394_unwrap_with(decrypt: Callable[[bytes], bytes], blob: bytes) -> bytes:
    """RFC 3394 unwrapping with an AES-ECB decryption oracle (the attacker's tool)."""
    n = len(blob) // 8 - 1
    a, r = blob[:8], [blob[8 * (i + 1):8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n, 0, -1):
            t = (n * j + i).to_bytes(8, "big")
            block = decrypt(bytes(x ^ y for x, y in zip(a, t, strict=True)) + r[i - 1])
            a, r[i - 1] = block[:8], block[8:]
    assert a == b"\xa6" * 8, "integrity check failed"
    return b"".join(r)


def denied(gw: Separated, what: str) -> bool:
    return any(r.get("msg") == "denied by policy" and r.get("rule") == "key_separation"
               and what in str(r.get("what")) for r in gw.records())


def test_wrap_then_decrypt(gw: Separated, c: tuple[RawClient, int]) -> None:
    """Clulow's attack: one key that may wrap and decrypt."""
    client, sess = c
    target = sensitive_target(client, sess)
    both = generate(client, sess, (CKA_WRAP, True), (CKA_DECRYPT, True))
    if not gw.separated:
        (blob,) = call(client, "C_WrapKey", sess, WRAP, both, target, 4096)
        got = rfc3394_unwrap_with(lambda x: ecb_decrypt(client, sess, both, x), bytes(blob))
        assert got == SECRET
        return
    assert rv(client, "C_WrapKey", sess, WRAP, both, target, 4096) == \
        ckr.KEY_FUNCTION_NOT_PERMITTED
    assert rv(client, "C_DecryptInit", sess, Mechanism(CKM_AES_ECB, None), both) == \
        ckr.KEY_FUNCTION_NOT_PERMITTED
    assert denied(gw, "may decrypt") and denied(gw, "may wrap")
    # a key that may only decrypt still decrypts; one that may only wrap still wraps
    plain = generate(client, sess, (CKA_WRAP, False), (CKA_DECRYPT, True),
                     (CKA_ENCRYPT, True))
    assert len(ecb_decrypt(client, sess, plain, b"\0" * 16)) == 16
    wrapper = generate(client, sess, (CKA_WRAP, True), (CKA_DECRYPT, False))
    (blob,) = call(client, "C_WrapKey", sess, WRAP, wrapper, target, 4096)
    assert len(blob) == 40


def test_roles_cannot_change(gw: Separated, c: tuple[RawClient, int]) -> None:
    """Wrap first with a wrap-only key, then give it CKA_DECRYPT (or copy it with it)."""
    client, sess = c
    target = sensitive_target(client, sess)
    wrapper = generate(client, sess, (CKA_WRAP, True), (CKA_DECRYPT, False))
    (blob,) = call(client, "C_WrapKey", sess, WRAP, wrapper, target, 4096)
    set_rv = rv(client, "C_SetAttributeValue", sess, wrapper, [b(CKA_DECRYPT, True)])
    copy_rv = rv(client, "C_CopyObject", sess, wrapper, [b(CKA_DECRYPT, True)])
    if not gw.separated:
        assert set_rv == ckr.OK and copy_rv == ckr.OK
        got = rfc3394_unwrap_with(lambda x: ecb_decrypt(client, sess, wrapper, x),
                                  bytes(blob))
        assert got == SECRET
        return
    assert set_rv == ckr.ATTRIBUTE_READ_ONLY and copy_rv == ckr.ATTRIBUTE_READ_ONLY
    assert rv(client, "C_SetAttributeValue", sess, wrapper, [b(CKA_WRAP, False)]) == \
        ckr.ATTRIBUTE_READ_ONLY
    (attrs, _) = call(client, "C_GetAttributeValue", sess, wrapper,
                      [AttrRequest(CKA_DECRYPT, 1)])
    assert attrs[0].value == 0  # unchanged on the token


def test_wrapping_key_of_known_value(gw: Separated, c: tuple[RawClient, int]) -> None:
    """A wrapping key the attacker made from a value it knows: the blob is opened
    offline. Only keys made on the token (CKA_LOCAL) may wrap."""
    client, sess = c
    target = sensitive_target(client, sess)
    (kek,) = call(client, "C_CreateObject", sess, aes(
        (CKA_WRAP, True), (CKA_DECRYPT, False), value=KNOWN_KEK))
    got = rv(client, "C_WrapKey", sess, WRAP, kek, target, 4096)
    if not gw.separated:
        (blob,) = call(client, "C_WrapKey", sess, WRAP, kek, target, 4096)
        assert keywrap.aes_key_unwrap(KNOWN_KEK, bytes(blob)) == SECRET
        return
    assert got == ckr.KEY_FUNCTION_NOT_PERMITTED and denied(gw, "CKA_LOCAL")
    # nor with one made on the token, read while it could be, then made sensitive
    readable = generate(client, sess, (CKA_WRAP, True), (CKA_DECRYPT, False),
                        (CKA_SENSITIVE, False), (CKA_EXTRACTABLE, True))
    (attrs, _) = call(client, "C_GetAttributeValue", sess, readable,
                      [AttrRequest(CKA_VALUE, 32)])
    assert len(attrs[0].value) == 32  # the attacker now knows it
    call(client, "C_SetAttributeValue", sess, readable, [b(CKA_SENSITIVE, True)])
    assert rv(client, "C_WrapKey", sess, WRAP, readable, target, 4096) == \
        ckr.KEY_FUNCTION_NOT_PERMITTED
    assert denied(gw, "not always sensitive")
    # nor may a template claim CKA_LOCAL for it
    assert rv(client, "C_CreateObject", sess,
              [*aes((CKA_WRAP, True), value=KNOWN_KEK), b(CKA_LOCAL, True)]) == \
        ckr.ATTRIBUTE_READ_ONLY


def test_wrapping_with_a_public_key(gw: Separated, c: tuple[RawClient, int]) -> None:
    """Its private half may decrypt (the gateway cannot tell): refused."""
    client, sess = c
    target = sensitive_target(client, sess)
    pub, _priv = call(client, "C_GenerateKeyPair", sess,
                      Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
                      [b(CKA_TOKEN, False), u(CKA_MODULUS_BITS, 1024), b(CKA_WRAP, True)],
                      [b(CKA_TOKEN, False), b(CKA_DECRYPT, True), b(CKA_UNWRAP, True)])
    got = rv(client, "C_WrapKey", sess, Mechanism(CKM_RSA_PKCS, None), pub, target, 4096)
    assert got == (ckr.KEY_FUNCTION_NOT_PERMITTED if gw.separated else ckr.OK)


def test_unwrap_as_not_sensitive(gw: Separated, c: tuple[RawClient, int]) -> None:
    """Wrap with a proper wrapping key, unwrap the blob as a key that is not sensitive,
    read its value."""
    client, sess = c
    target = sensitive_target(client, sess)
    wrapper = generate(client, sess, (CKA_WRAP, True), (CKA_UNWRAP, True),
                       (CKA_DECRYPT, False))
    (blob,) = call(client, "C_WrapKey", sess, WRAP, wrapper, target, 4096)
    loose = [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, False),
             b(CKA_EXTRACTABLE, True)]
    if not gw.separated:
        (copy,) = call(client, "C_UnwrapKey", sess, WRAP, wrapper, bytes(blob),
                       [*loose, b(CKA_SENSITIVE, False)])
        (attrs, _) = call(client, "C_GetAttributeValue", sess, copy,
                          [AttrRequest(CKA_VALUE, 32)])
        assert attrs[0].value == SECRET
        return
    assert rv(client, "C_UnwrapKey", sess, WRAP, wrapper, bytes(blob),
              [*loose, b(CKA_SENSITIVE, False)]) == ckr.TEMPLATE_INCONSISTENT
    # without CKA_SENSITIVE in the template the unwrapped key is made sensitive
    (copy,) = call(client, "C_UnwrapKey", sess, WRAP, wrapper, bytes(blob), loose)
    (attrs, _) = call(client, "C_GetAttributeValue", sess, copy,
                      [AttrRequest(CKA_SENSITIVE, 1), AttrRequest(CKA_VALUE, 32)])
    assert attrs[0].value == 1 and attrs[1].length is None


def test_revealing_derivation(gw: Separated, c: tuple[RawClient, int]) -> None:
    client, sess = c
    target = sensitive_target(client, sess)
    got = rv(client, "C_DeriveKey", sess, Mechanism(CKM_XOR_BASE_AND_DATA, b"\0" * 32),
             target, [u(CKA_CLASS, CKO_SECRET_KEY), b(CKA_SENSITIVE, False)])
    if not gw.separated:
        assert got != ckr.OK  # SoftHSM lacks the mechanism: nothing to show off
        assert not denied(gw, "reveals the base key")
        return
    assert got == ckr.MECHANISM_INVALID and denied(gw, "reveals the base key")

"""CKA_TRUSTED may be set true only by the security officer (PKCS#11 2.40 §4.8, and
SoftHSM refuses it with CKR_ATTRIBUTE_READ_ONLY). The soft token took it from any user's
template: a user made a secret key of a value it chose with CKA_TRUSTED true and wrapped
under it a key marked CKA_WRAP_WITH_TRUSTED, then unwrapped the blob itself: the key
value, which CKA_WRAP_WITH_TRUSTED exists to keep in trusted keys, in the client's hands.

Raw frames, a real gateway process; the same assertions against SoftHSM behind the
gateway (the plain token), which the soft token must not answer more loosely than."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import keywrap
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_EXTRACTABLE,
    CKA_KEY_TYPE,
    CKA_SENSITIVE,
    CKA_TOKEN,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKF_RW,
    CKF_SERIAL,
    CKK_AES,
    CKM_AES_KEY_GEN,
    CKO_SECRET_KEY,
    CKU_USER,
    b,
    call,
    rv,
    s,
    u,
)
from tests.gateway_proc import Gateway, RawClient, write_config
from tests.soft_token import make_soft_token
from tests.softhsm import make_token

from p11gate.codec import Mechanism, ckr

CKA_TRUSTED, CKA_WRAP, CKA_WRAP_WITH_TRUSTED = 0x86, 0x106, 0x210
CKM_AES_KEY_WRAP = 0x2109
KEK = bytes(range(32))  # the value the attacker chose


@pytest.fixture(params=["soft", "softhsm"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[RawClient, int]]:
    tok = (make_soft_token(tmp_path / "tok", keys=False) if request.param == "soft"
           else make_token(tmp_path / "tok", keys=False))
    gw = Gateway(write_config(tmp_path, tok))
    c = RawClient(gw.path)
    try:
        c.initialize()
        (slots,) = call(c, "C_GetSlotList", 1, 8)
        (sess,) = call(c, "C_OpenSession", slots[0], CKF_SERIAL | CKF_RW)
        call(c, "C_Login", sess, CKU_USER, b"1234")
        yield c, sess
        assert gw.alive()
    finally:
        c.close()
        gw.stop()


def _guarded_key(c: RawClient, sess: int) -> int:
    """A key that may leave the token only wrapped by a trusted key."""
    (h,) = call(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None), [
        u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), u(CKA_VALUE_LEN, 32),
        b(CKA_TOKEN, False), b(CKA_SENSITIVE, True), b(CKA_EXTRACTABLE, True),
        b(CKA_WRAP_WITH_TRUSTED, True)])
    return int(h)


def _kek_template(trusted: bool) -> list[object]:
    return [u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), b(CKA_TOKEN, False),
            s(CKA_VALUE, KEK), b(CKA_WRAP, True), b(CKA_TRUSTED, trusted)]


def test_a_user_cannot_make_a_trusted_key_and_wrap_a_wrap_with_trusted_key_out(
        client: tuple[RawClient, int]) -> None:
    c, sess = client
    guarded = _guarded_key(c, sess)
    mech = Mechanism(CKM_AES_KEY_WRAP, None)

    # an untrusted key of the user's may not wrap it
    (untrusted,) = call(c, "C_CreateObject", sess, _kek_template(False))
    assert rv(c, "C_WrapKey", sess, mech, untrusted, guarded, 1024) == ckr.KEY_NOT_WRAPPABLE

    # nor may the user make a trusted one: by import, by generation
    assert rv(c, "C_CreateObject", sess, _kek_template(True)) == ckr.ATTRIBUTE_READ_ONLY
    assert rv(c, "C_GenerateKey", sess, Mechanism(CKM_AES_KEY_GEN, None), [
        u(CKA_CLASS, CKO_SECRET_KEY), u(CKA_KEY_TYPE, CKK_AES), u(CKA_VALUE_LEN, 32),
        b(CKA_TOKEN, False), b(CKA_WRAP, True), b(CKA_TRUSTED, True)]) == (
            ckr.ATTRIBUTE_READ_ONLY)
    # nor turn its own key trusted
    assert rv(c, "C_SetAttributeValue", sess, untrusted, [b(CKA_TRUSTED, True)]) == (
        ckr.ATTRIBUTE_READ_ONLY)


def test_the_attack_end_to_end_gets_nothing(client: tuple[RawClient, int]) -> None:
    """Had the trusted key been made, the wrap gives the guarded key's value."""
    c, sess = client
    guarded = _guarded_key(c, sess)
    try:
        (kek,) = call(c, "C_CreateObject", sess, _kek_template(True))
    except Exception:
        return  # refused, as asserted above
    (blob,) = call(c, "C_WrapKey", sess, Mechanism(CKM_AES_KEY_WRAP, None), kek, guarded,
                   1024)
    value = keywrap.aes_key_unwrap(KEK, blob)
    pytest.fail(f"the user unwrapped a CKA_WRAP_WITH_TRUSTED key: {len(value)} bytes")

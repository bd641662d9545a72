"""The soft token's file: nothing sensitive in clear, a wrong PIN unwraps nothing,
objects survive a restart."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.soft.helpers import SO_PIN, USER_PIN, Driver, initialised, soft_config

from p11gate.backends.soft.store import SO, USER, SoftStore, derive_kek
from p11gate.codec import ckr
from p11gate.codec.values import Attribute, AttrRequest, Mechanism

P256 = bytes.fromhex("06082a8648ce3d030107")
CKM_EC_KEY_PAIR_GEN, CKM_AES_KEY_GEN = 0x1040, 0x1080


def _file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    for extra in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if extra.exists():
            data += extra.read_bytes()
    return data


def test_wrong_pin_unwraps_nothing(tmp_path: Path) -> None:
    st = SoftStore(str(tmp_path / "t.db"))
    key = st.init_token(b"x", b"s" * 16, derive_kek(b"right-pin", b"s" * 16))
    assert st.unlock(SO, derive_kek(b"right-pin", b"s" * 16)) == key
    assert st.unlock(SO, derive_kek(b"wrong-pin", b"s" * 16)) is None
    assert st.unlock(USER, derive_kek(b"right-pin", b"s" * 16)) is None  # no user PIN yet
    st.close()


def test_nothing_sensitive_in_clear_and_keys_persist(tmp_path: Path) -> None:
    path = tmp_path / "token.db"
    d = initialised(path)
    (s,) = d("C_OpenSession", 1, 6)
    d("C_Login", s, 1, USER_PIN)
    _pub, priv = d("C_GenerateKeyPair", s, Mechanism(CKM_EC_KEY_PAIR_GEN),
                  [Attribute(0x1, 1, 1), Attribute(0x180, P256, len(P256))],
                  [Attribute(0x1, 1, 1), Attribute(0x102, b"k1", 2)])
    hidden = b"private data value 0123456789"
    (data_obj,) = d("C_CreateObject", s, [Attribute(0, 0, 8), Attribute(1, 1, 1),
                                          Attribute(2, 1, 1), Attribute(0x11, hidden, 29)])
    (aes,) = d("C_GenerateKey", s, Mechanism(CKM_AES_KEY_GEN),
               [Attribute(0x1, 1, 1), Attribute(0x161, 32, 8)])
    # the key values are sensitive: never readable
    attrs, rv = d("C_GetAttributeValue", s, priv, [AttrRequest(0x11, 64)])
    assert rv == ckr.ATTRIBUTE_SENSITIVE and attrs[0].length is None
    # look into the backend's memory for the real values, then grep the file for them
    tok = d.backend._token
    assert tok is not None
    der = tok.key_value(tok.objects[priv])
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    aes_value = tok.key_value(tok.objects[aes])
    d.close()
    assert path.stat().st_mode & 0o777 == 0o600
    data = _file_bytes(path)
    for secret in (der, scalar, aes_value, USER_PIN, SO_PIN, hidden):
        assert secret not in data
    assert b"k1".hex().encode() in data or b"k1" in data  # the public id is there
    # restart: the objects are back, usable after login, not before
    d = Driver(soft_config(path))
    (s,) = d("C_OpenSession", 1, 6)
    assert d.rv("C_SignInit", s, Mechanism(0x1041), priv) == ckr.KEY_HANDLE_INVALID
    assert d.rv("C_Login", s, 1, b"wrong-pin") == ckr.PIN_INCORRECT
    d("C_Login", s, 1, USER_PIN)
    d("C_SignInit", s, Mechanism(0x1041), priv)
    (sig,) = d("C_Sign", s, b"\1" * 32, 64)
    assert len(sig) == 64
    attrs, rv = d("C_GetAttributeValue", s, data_obj, [AttrRequest(0x11, 64)])
    assert rv == 0 and attrs[0].value == hidden
    d("C_FindObjectsInit", s, [Attribute(0x11, hidden, len(hidden))])
    assert d("C_FindObjects", s, 8) == [[data_obj]]
    d("C_FindObjectsFinal", s)
    d.close()


def test_two_stores_on_one_file_see_each_others_changes(tmp_path: Path) -> None:
    """Two processes' connections (WAL): a commit in one is noticed by the other once
    (data_version), objects written by one are read by the other, and a second
    unattended initialisation does not wipe the first."""
    path = tmp_path / "t.db"
    a = Driver(soft_config(path))
    b = Driver(soft_config(path))
    a("C_InitToken", 1, SO_PIN, b"shared")
    ta, tb = a.backend._token, b.backend._token
    assert ta is not None and tb is not None
    assert tb.store.changed() and not tb.store.changed()
    assert not ta.store.changed()  # its own commits are not "changes"
    (sa,) = a("C_OpenSession", 1, 6)
    a("C_Login", sa, 0, SO_PIN)
    a("C_InitPIN", sa, USER_PIN)
    a("C_Logout", sa)
    a("C_Login", sa, 1, USER_PIN)
    (aes,) = a("C_GenerateKey", sa, Mechanism(CKM_AES_KEY_GEN),
               [Attribute(0x1, 1, 1), Attribute(0x161, 32, 8), Attribute(0x3, b"ka", 2)])
    (sb,) = b("C_OpenSession", 1, 6)
    b("C_Login", sb, 1, USER_PIN)  # the user PIN set through a works in b
    b("C_FindObjectsInit", sb, [Attribute(0x3, b"ka", 2)])
    assert b("C_FindObjects", sb, 8) == [[aes]]
    b("C_FindObjectsFinal", sb)
    b("C_DestroyObject", sb, aes)
    assert a.rv("C_GetAttributeValue", sa, aes, [AttrRequest(0x3, 8)]) == \
        ckr.OBJECT_HANDLE_INVALID
    a("C_CloseSession", sa)
    b("C_CloseSession", sb)
    # C_InitToken in a: b's token key is gone, b is logged out and sees no old objects
    (sb,) = b("C_OpenSession", 1, 6)
    b("C_Login", sb, 1, USER_PIN)
    a("C_InitToken", 1, SO_PIN, b"again")
    assert b.rv("C_Logout", sb) == ckr.USER_NOT_LOGGED_IN
    assert b("C_GetTokenInfo", 1)[0].rstrip() == b"again"
    b.close()
    a.close()


def test_unattended_initialisation_happens_once(tmp_path: Path) -> None:
    import asyncio

    from p11gate.backends.soft.token import SoftToken

    path = str(tmp_path / "t.db")
    first, second = SoftToken(SoftStore(path)), SoftToken(SoftStore(path))
    asyncio.run(first.initialise_unattended(b"one", SO_PIN, USER_PIN))
    epoch = first.store.epoch
    asyncio.run(second.initialise_unattended(b"two", b"other-so-pin", b"other-user"))
    assert second.store.epoch == epoch and second.store.label == b"one"
    salt, blob = second.store.wrapping(USER) or (b"", b"")
    assert second.store.open_wrap(USER, derive_kek(USER_PIN, salt), blob) is not None
    first.store.close()
    second.store.close()

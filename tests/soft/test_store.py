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


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    import pytest

    st = SoftStore(str(tmp_path / "t.db"))
    with pytest.raises(OSError, match="in use"):
        SoftStore(str(tmp_path / "t.db"))
    st.close()
    SoftStore(str(tmp_path / "t.db")).close()

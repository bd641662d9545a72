"""The soft token's key file: the database alone opens nothing, even with the PINs; a
token made with a key file is served only with that key file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway
from tests.soft.test_soft_gateway import SO_PIN, USER_PIN, soft_gateway_config, tool

from p11gate.backends.soft.store import (
    SO,
    USER,
    KeyFileMismatch,
    SoftStore,
    _unwrap,
    derive_kek,
    read_key_file,
)

SALT = b"s" * 16


def _key_file(path: Path, secret: bytes | None = None) -> bytes:
    secret = os.urandom(32) if secret is None else secret
    path.write_bytes(secret)
    path.chmod(0o600)
    return secret


def test_the_database_and_the_pin_without_the_key_file_open_nothing(tmp_path: Path) -> None:
    secret = _key_file(tmp_path / "k")
    st = SoftStore(str(tmp_path / "t.db"), secret)
    key = st.init_token(b"x", SALT, derive_kek(SO_PIN.encode(), SALT),
                        user=(SALT, derive_kek(USER_PIN.encode(), SALT)))
    assert key is not None
    assert st.unlock(SO, derive_kek(SO_PIN.encode(), SALT)) == key
    assert st.unlock(USER, derive_kek(USER_PIN.encode(), SALT)) == key
    st.close()
    # an attacker with the file and both PINs: the wraps do not open
    db = sqlite3.connect(tmp_path / "t.db")
    meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    db.close()
    for role, pin in ((SO, SO_PIN), (USER, USER_PIN)):
        kek = derive_kek(pin.encode(), bytes(meta[f"{role}_salt"]))
        assert _unwrap(kek, role, bytes(meta[f"{role}_wrap"])) is None
    assert secret not in (tmp_path / "t.db").read_bytes()


def test_a_token_is_opened_only_with_its_own_key_file(tmp_path: Path) -> None:
    secret = _key_file(tmp_path / "k")
    st = SoftStore(str(tmp_path / "t.db"), secret)
    st.init_token(b"x", SALT, derive_kek(b"right-pin", SALT))
    st.close()
    with pytest.raises(KeyFileMismatch, match="give key_file"):
        SoftStore(str(tmp_path / "t.db"))
    with pytest.raises(KeyFileMismatch, match="not the one"):
        SoftStore(str(tmp_path / "t.db"), os.urandom(32))
    again = SoftStore(str(tmp_path / "t.db"), secret)
    assert again.unlock(SO, derive_kek(b"right-pin", SALT)) is not None
    again.close()
    # and a token made without one is not opened with one
    plain = SoftStore(str(tmp_path / "p.db"))
    plain.init_token(b"x", SALT, derive_kek(b"right-pin", SALT))
    plain.close()
    with pytest.raises(KeyFileMismatch, match="without a key file"):
        SoftStore(str(tmp_path / "p.db"), secret)


def test_key_file_format_and_mode(tmp_path: Path) -> None:
    f = tmp_path / "k"
    secret = _key_file(f)
    assert read_key_file(str(f)) == secret
    f.write_text(secret.hex() + "\n")
    assert read_key_file(str(f)) == secret
    f.write_bytes(b"short")
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        read_key_file(str(f))
    _key_file(f)
    f.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        read_key_file(str(f))


def _with_key_file(base: Path, key_file: Path | None) -> Path:
    cfg = soft_gateway_config(base)
    if key_file is not None:
        text = cfg.read_text().replace('label = "softtok"\n',
                                       f'label = "softtok"\nkey_file = "{key_file}"\n')
        cfg.write_text(text)
    return cfg


def test_a_gateway_serves_a_key_file_token_and_not_without_it(tmp_path: Path) -> None:
    """Through the real client: keys made on a key-file token sign after a restart with
    the key file; without it (or with another) the token is not served, and no PIN or
    secret reaches the log."""
    secret = _key_file(tmp_path / "soft.key")
    cfg = _with_key_file(tmp_path, tmp_path / "soft.key")
    g = Gateway(cfg)
    try:
        tool(g, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type", "EC:prime256v1",
             "--id", "07", "--label", "kf")
        (tmp_path / "data").write_bytes(bytes(range(32)))  # a digest: raw ECDSA
        tool(g, "--login", "--pin", USER_PIN, "--sign", "--mechanism", "ECDSA",
             "--id", "07", "--input-file", str(tmp_path / "data"),
             "--output-file", str(tmp_path / "sig"))
        assert len((tmp_path / "sig").read_bytes()) == 64
    finally:
        g.stop()
    # with the key file again: the key still signs
    g = Gateway(cfg)
    try:
        tool(g, "--login", "--pin", USER_PIN, "--sign", "--mechanism", "ECDSA",
             "--id", "07", "--input-file", str(tmp_path / "data"),
             "--output-file", str(tmp_path / "sig2"))
        assert len((tmp_path / "sig2").read_bytes()) == 64
    finally:
        g.stop()
    # without it: the gateway runs with the soft back end down, and says why
    cfg = _with_key_file(tmp_path, None)
    g = Gateway(cfg)
    try:
        listed = tool(g, "-L", check=False).stdout
        assert "softtok" not in listed
        assert "give key_file" in g.log()
        out = g.log()
    finally:
        g.stop()
    assert USER_PIN not in out and SO_PIN not in out and secret.hex() not in out

"""The soft token's file: SQLite (WAL), one transaction per change.

At rest nothing sensitive is in clear:

* a random 256-bit *token key* encrypts the value of every private and secret key and
  the CKA_VALUE of private data objects (AES-256-GCM, a random 96-bit nonce per value,
  the object's handle as associated data so that values cannot be swapped between rows);
* the token key is stored only wrapped (AES-256-GCM) under a key derived from the user
  PIN, and separately under one derived from the SO PIN (scrypt, a random salt each);
* PINs are never stored; a wrong PIN fails the GCM tag and unwraps nothing.

Other attributes (labels, ids, public keys, certificates) are stored in clear.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

#: scrypt cost: ~0.1 s and 16 MiB per derivation (run in a thread, never on the loop)
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SO, USER = "so", "user"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    handle INTEGER PRIMARY KEY AUTOINCREMENT,
    attrs TEXT NOT NULL,
    secret BLOB
);
"""

Attrs = dict[int, int | bytes]


def derive_kek(pin: bytes, salt: bytes) -> bytes:
    """The key-encryption key of one PIN (CPU and memory heavy: call in a thread)."""
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(pin)


def _wrap(kek: bytes, role: str, token_key: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, token_key, b"p11gate soft token key " +
                                       role.encode())


def _unwrap(kek: bytes, role: str, blob: bytes) -> bytes | None:
    try:
        return AESGCM(kek).decrypt(blob[:12], blob[12:], b"p11gate soft token key " +
                                   role.encode())
    except (InvalidTag, ValueError):
        return None


def seal(token_key: bytes, handle: int, value: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(token_key).encrypt(nonce, value, b"object %d" % handle)


def unseal(token_key: bytes, handle: int, blob: bytes) -> bytes:
    """Raises ValueError if the blob was not sealed with this key for this handle."""
    try:
        return AESGCM(token_key).decrypt(blob[:12], blob[12:], b"object %d" % handle)
    except InvalidTag:
        raise ValueError("object value does not decrypt") from None


def encode_attrs(attrs: Attrs) -> str:
    return json.dumps([[t, v] if isinstance(v, int) else [t, v.hex(), 0]
                       for t, v in sorted(attrs.items())])


def decode_attrs(text: str) -> Attrs:
    out: Attrs = {}
    for item in json.loads(text):
        out[int(item[0])] = int(item[1]) if len(item) == 2 else bytes.fromhex(item[1])
    return out


class SoftStore:
    """One token's SQLite file. All methods are quick (no key derivation)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # one owner at a time: objects are cached in memory, a second writer would
        # make the caches disagree with the file
        self._lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise OSError(f"{path} is in use by another process") from None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()
        os.close(self._lock)

    # ------------------------------------------------------------------ meta

    def _meta(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else bytes(row[0])

    def _set_meta(self, k: str, v: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (k, v))

    @property
    def initialized(self) -> bool:
        return self._meta("so_wrap") is not None

    @property
    def user_pin_initialized(self) -> bool:
        return self._meta("user_wrap") is not None

    @property
    def label(self) -> bytes:
        return self._meta("label") or b""

    @property
    def serial(self) -> bytes:
        s = self._meta("serial")
        if s is None:
            s = os.urandom(8).hex().encode()
            self._set_meta("serial", s)
        return s

    def salt(self, role: str) -> bytes | None:
        return self._meta(f"{role}_salt")

    def unlock(self, role: str, kek: bytes) -> bytes | None:
        """The token key, or None if ``kek`` (from the PIN) is wrong."""
        blob = self._meta(f"{role}_wrap")
        return None if blob is None else _unwrap(kek, role, blob)

    def init_token(self, label: bytes, so_salt: bytes, so_kek: bytes) -> bytes:
        """Wipe the token and give it a new token key wrapped for the SO only."""
        token_key = os.urandom(32)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM objects")
            self.db.execute("DELETE FROM meta WHERE k LIKE 'user_%'")
            self._set_meta("label", label)
            self._set_meta("so_salt", so_salt)
            self._set_meta("so_wrap", _wrap(so_kek, SO, token_key))
        return token_key

    def set_pin(self, role: str, token_key: bytes, salt: bytes, kek: bytes) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self._set_meta(f"{role}_salt", salt)
            self._set_meta(f"{role}_wrap", _wrap(kek, role, token_key))

    # ------------------------------------------------------------------ objects

    def load(self) -> list[tuple[int, Attrs, bytes | None]]:
        rows = self.db.execute("SELECT handle, attrs, secret FROM objects ORDER BY handle")
        return [(int(h), decode_attrs(a), None if s is None else bytes(s)) for h, a, s in rows]

    def add(self, attrs: Attrs, value: bytes | None, token_key: bytes | None) -> tuple[
            int, bytes | None]:
        """Insert one object; its secret ``value`` is sealed under the token key.
        Returns (handle, sealed value)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("INSERT INTO objects (attrs) VALUES (?)",
                                  (encode_attrs(attrs),))
            handle = int(cur.lastrowid or 0)
            blob = None
            if value is not None:
                assert token_key is not None
                blob = seal(token_key, handle, value)
                self.db.execute("UPDATE objects SET secret = ? WHERE handle = ?",
                                (blob, handle))
        return handle, blob

    def update(self, handle: int, attrs: Attrs) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE objects SET attrs = ? WHERE handle = ?",
                            (encode_attrs(attrs), handle))

    def delete(self, handle: int) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM objects WHERE handle = ?", (handle,))


def read_pin_file(path: str) -> bytes:
    """A PIN file: the PIN on its first line (a trailing newline is not part of it)."""
    with open(path, "rb") as f:
        data = f.read(4096)
    pin = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not pin:
        raise ValueError(f"{path}: the PIN file is empty")
    return pin

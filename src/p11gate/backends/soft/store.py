"""The soft token's file: SQLite (WAL), one transaction per change.

At rest nothing sensitive is in clear:

* a random 256-bit *token key* encrypts the value of every private and secret key and
  the CKA_VALUE of private data objects (AES-256-GCM, a random 96-bit nonce per value,
  the object's handle as associated data so that values cannot be swapped between rows);
* the token key is stored only wrapped (AES-256-GCM) under a key derived from the user
  PIN, and separately under one derived from the SO PIN (scrypt, a random salt each);
* PINs are never stored; a wrong PIN fails the GCM tag and unwraps nothing;
* with a *key file* (``key_file`` in the configuration, 32 random bytes kept apart from
  the database: another disk, a systemd credential, a TPM-sealed secret), every
  PIN-derived key is bound to it (HKDF-SHA256 over the scrypt output, salted with the key
  file's secret), so the database without the key file opens nothing, even to someone who
  knows or guesses the PINs. A check value (an HMAC of a fixed string under the secret)
  tells a missing or wrong key file apart from a wrong PIN at start.

Other attributes (labels, ids, public keys, certificates) are stored in clear.

Several gateway processes may serve the same file at once: every change is one
``BEGIN IMMEDIATE`` transaction, and each process notices the others' commits through
``PRAGMA data_version`` (``changed()``) and re-reads the objects before its next call. A
C_InitToken elsewhere gives the token a new *epoch*: the processes that see it log out,
since the token key they hold no longer opens anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from hmac import compare_digest

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

#: scrypt cost: ~0.1 s and 16 MiB per derivation (run in a thread, never on the loop)
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SO, USER = "so", "user"
#: seconds a transaction waits for another process's write lock
BUSY_TIMEOUT = 10.0
#: size of a key file's secret, bytes
KEY_FILE_BYTES = 32


class KeyFileMismatch(Exception):
    """The configured key file (or its absence) does not match the token's file."""

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

    def __init__(self, path: str, file_secret: bytes | None = None) -> None:
        self.path = path
        self.file_secret = file_secret
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        # another process's transaction holds the write lock for milliseconds: wait for it
        self.db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            # the serial is made once, by whichever process comes first
            self.db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('serial', ?)",
                            (os.urandom(8).hex().encode(),))
        self._seen = self._data_version()
        self._check_key_file()

    def _key_file_check(self) -> bytes:
        assert self.file_secret is not None
        mac = hmac.HMAC(self.file_secret, hashes.SHA256())
        mac.update(b"p11gate soft token key file check")
        return mac.finalize()

    def _check_key_file(self) -> None:
        """An initialised token is opened only with the key file it was made with."""
        bound = self._meta("key_file_check")
        if not self.initialized:
            return
        if bound is None and self.file_secret is not None:
            self.db.close()
            raise KeyFileMismatch("the token was made without a key file: remove key_file, "
                                  "or make a new token with it")
        if bound is not None and self.file_secret is None:
            self.db.close()
            raise KeyFileMismatch("the token was made with a key file: give key_file")
        if bound is not None and not compare_digest(bound, self._key_file_check()):
            self.db.close()
            raise KeyFileMismatch("key_file is not the one this token was made with")

    def bind(self, kek: bytes) -> bytes:
        """A PIN's key-encryption key, bound to the key file where there is one."""
        if self.file_secret is None:
            return kek
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=self.file_secret,
                    info=b"p11gate soft token key file").derive(kek)

    def close(self) -> None:
        self.db.close()

    def _data_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        """True once after another connection committed a change to the file."""
        now = self._data_version()
        if now == self._seen:
            return False
        self._seen = now
        return True

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
        return self._meta("serial") or b""

    @property
    def epoch(self) -> bytes:
        """Changes with every C_InitToken (in any process)."""
        return self._meta("epoch") or b""

    def wrapping(self, role: str) -> tuple[bytes, bytes] | None:
        """(salt, wrapped token key) of one role, read together so that a C_SetPIN in
        another process cannot pair one PIN's salt with another's wrap."""
        with self.db:
            self.db.execute("BEGIN")
            salt, blob = self._meta(f"{role}_salt"), self._meta(f"{role}_wrap")
        return None if salt is None or blob is None else (salt, blob)

    def salt(self, role: str) -> bytes | None:
        w = self.wrapping(role)
        return None if w is None else w[0]

    def open_wrap(self, role: str, kek: bytes, blob: bytes) -> bytes | None:
        """The token key from a (salt, wrap) pair read by ``wrapping``."""
        return _unwrap(self.bind(kek), role, blob)

    def unlock(self, role: str, kek: bytes) -> bytes | None:
        """The token key, or None if ``kek`` (from the PIN) is wrong."""
        blob = self._meta(f"{role}_wrap")
        return None if blob is None else _unwrap(self.bind(kek), role, blob)

    def init_token(self, label: bytes, so_salt: bytes, so_kek: bytes,
                   only_if_new: bool = False,
                   user: tuple[bytes, bytes] | None = None) -> bytes | None:
        """Wipe the token and give it a new token key wrapped for the SO only. With
        ``only_if_new``, do nothing (None) if some process initialised it meanwhile; with
        ``user`` (salt, key-encryption key), set the user PIN in the same transaction."""
        token_key = os.urandom(32)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if only_if_new and self._meta("so_wrap") is not None:
                return None
            self.db.execute("DELETE FROM objects")
            self._set_meta("epoch", os.urandom(16))
            self.db.execute("DELETE FROM meta WHERE k LIKE 'user_%'")
            self._set_meta("label", label)
            self._set_meta("so_salt", so_salt)
            self._set_meta("so_wrap", _wrap(self.bind(so_kek), SO, token_key))
            if self.file_secret is not None:
                self._set_meta("key_file_check", self._key_file_check())
            else:
                self.db.execute("DELETE FROM meta WHERE k = 'key_file_check'")
            if user is not None:
                self._set_meta("user_salt", user[0])
                self._set_meta("user_wrap", _wrap(self.bind(user[1]), USER, token_key))
        return token_key

    def set_pin(self, role: str, token_key: bytes, salt: bytes, kek: bytes) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self._set_meta(f"{role}_salt", salt)
            self._set_meta(f"{role}_wrap", _wrap(self.bind(kek), role, token_key))

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


def read_key_file(path: str) -> bytes:
    """A key file: exactly 32 bytes (``head -c 32 /dev/urandom``) or 64 hex digits, not
    readable by group or others."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: a key file must not be readable by group or others "
                         "(chmod 600)")
    with open(path, "rb") as f:
        data = f.read(4096)
    if len(data) == KEY_FILE_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_FILE_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ValueError(f"{path}: a key file holds exactly {KEY_FILE_BYTES} bytes "
                     f"or {2 * KEY_FILE_BYTES} hex digits")


def read_pin_file(path: str) -> bytes:
    """A PIN file: the PIN on its first line (a trailing newline is not part of it)."""
    with open(path, "rb") as f:
        data = f.read(4096)
    pin = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not pin:
        raise ValueError(f"{path}: the PIN file is empty")
    return pin

"""Login state of one virtual token, shared by all client connections.

The backend is one module instance whose login is token-wide, so the gateway owns it:
the first client login goes to the backend; while the backend is logged in, later logins
are checked against a salted hash of the PIN that succeeded (constant time). The PIN
itself is kept in memory only while some client is logged in (to log the backend in
again after a worker restart) and wiped when the last one logs out. Never on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import os

PBKDF2_ITERATIONS = 20_000


class LoginState:
    __slots__ = ("_digest", "_pin", "_salt", "holders", "user_type")

    def __init__(self) -> None:
        self.user_type: int | None = None
        #: ids of the client connections that are logged in
        self.holders: set[int] = set()
        self._pin: bytearray | None = None
        self._salt = b""
        self._digest = b""

    @property
    def backend_logged_in(self) -> bool:
        return self.user_type is not None

    def set(self, user_type: int, pin: bytes) -> None:
        self.user_type = user_type
        self._pin = bytearray(pin)
        self._salt = os.urandom(16)
        self._digest = _hash(pin, self._salt)

    def verify(self, pin: bytes) -> bool:
        return hmac.compare_digest(_hash(pin, self._salt), self._digest)

    def change_pin(self, pin: bytes) -> None:
        if self.user_type is not None:
            self.set(self.user_type, pin)

    def pin(self) -> bytes | None:
        return None if self._pin is None else bytes(self._pin)

    def clear(self) -> None:
        if self._pin is not None:
            self._pin[:] = b"\0" * len(self._pin)
        self._pin = None
        self.user_type = None
        self.holders.clear()
        self._salt = self._digest = b""

    def __repr__(self) -> str:  # never show the PIN
        return f"LoginState(user_type={self.user_type}, holders={len(self.holders)})"


def _hash(pin: bytes, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", pin, salt, PBKDF2_ITERATIONS)

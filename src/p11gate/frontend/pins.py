"""PIN virtualisation helpers: slow salted PIN hashes and per-identity throttling.

``mapped`` tokens check each identity's own PIN against a scrypt hash (from the
configuration, made with ``p11gate hash-pin``, or set by the client with C_SetPIN and
kept in the registry); the gateway logs into the backend with a credential the clients
never see. Wrong PINs are counted per identity: after ``max_failures`` in a row the
identity is refused with CKR_PIN_LOCKED for a lock-out period that doubles each time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import time

from ..state.base import StateStore

#: scrypt cost: about 50 ms and 16 MiB per check on this class of machine
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MAX_LOCKOUT = 3600.0


def hash_pin(pin: bytes, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(pin, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_pin(pin: bytes, stored: str) -> bool:
    """Constant-time check of ``pin`` against a ``hash_pin`` string (blocking: ~50 ms)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(pin, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def valid_hash(stored: str) -> bool:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        int(parts[1]), int(parts[2]), int(parts[3])
        base64.b64decode(parts[4], validate=True)
        base64.b64decode(parts[5], validate=True)
    except ValueError:
        return False
    return True


class PinThrottle:
    """Wrong PINs per identity, counted *before* they are checked: an attempt takes a
    slot when it starts, so logins sent at once cannot all be checked before the first
    failures count. At most ``max_failures`` attempts (failed or still in flight) are
    allowed in a row; further attempts wait for those in flight to end (a right PIN
    frees the way, wrong ones lock the identity out)."""

    def __init__(self, max_failures: int, lockout: float) -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        #: identity key → (consecutive failures, locked until (monotonic), next lock-out)
        self._state: dict[str, tuple[int, float, float]] = {}
        #: identity key → attempts started and not yet finished
        self._inflight: dict[str, int] = {}
        #: identity key → attempts waiting for one in flight to end
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        #: lock-outs begun since start (metrics)
        self.lockouts = 0

    def locked_for(self, who: str) -> float:
        """Seconds ``who`` must still wait (0 = may try)."""
        st = self._state.get(who)
        if st is None:
            return 0.0
        return max(0.0, st[1] - time.monotonic())

    def begin(self, who: str) -> float:
        """Start an attempt: 0 when it may go ahead (then call :meth:`failed`,
        :meth:`succeeded` or :meth:`abandoned`), else the seconds to wait (locked out,
        or as many attempts in flight as may still fail)."""
        wait = self.locked_for(who)
        if wait > 0:
            return wait
        fails = self._state.get(who, (0, 0.0, 0.0))[0]
        inflight = self._inflight.get(who, 0)
        if fails + inflight >= self.max_failures:
            return max(self.lockout, 1.0)
        self._inflight[who] = inflight + 1
        return 0.0

    async def acquire(self, who: str) -> float:
        """Like :meth:`begin`, but an attempt that only has to wait for others in flight
        waits (instead of being refused): 0 = go ahead, else seconds locked out."""
        while True:
            wait = self.begin(who)
            if wait == 0 or self._inflight.get(who, 0) == 0 or self.locked_for(who) > 0:
                return wait
            await self._wait_for_end(who)

    async def _wait_for_end(self, who: str, timeout: float | None = None) -> None:
        """Wait until an attempt of ``who`` in flight ends in this process
        (:meth:`_wake`), or at most ``timeout`` seconds (for attempts in other
        processes, which cannot wake this one)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(who, []).append(fut)
        try:
            if timeout is None:
                await fut
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, timeout)
        finally:
            # a waiter that timed out or was cancelled leaves no future behind
            waiters = self._waiting.get(who)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiting[who]

    def _wake(self, who: str) -> None:
        """An attempt of ``who`` ended: every waiter looks again."""
        for fut in self._waiting.pop(who, ()):
            if not fut.done():
                fut.set_result(None)

    def _end(self, who: str) -> None:
        n = self._inflight.get(who, 0) - 1
        if n > 0:
            self._inflight[who] = n
        else:
            self._inflight.pop(who, None)
        self._wake(who)

    def failed(self, who: str) -> None:
        self._end(who)
        fails, _, next_lock = self._state.get(who, (0, 0.0, self.lockout))
        fails += 1
        if fails >= self.max_failures:
            self.lockouts += 1
            self._state[who] = (0, time.monotonic() + next_lock, min(next_lock * 2, MAX_LOCKOUT))
        else:
            self._state[who] = (fails, 0.0, next_lock)

    def succeeded(self, who: str) -> None:
        self._end(who)
        self._state.pop(who, None)

    def abandoned(self, who: str) -> None:
        """The attempt ended without a PIN verdict (a device error, a busy token)."""
        self._end(who)


class MappedPins:
    """The PIN hash of each identity on one ``mapped`` token: from the configuration, or
    from the registry once the identity changed its PIN with C_SetPIN. An override
    is remembered with the configured hash it replaced, so an operator who sets a new
    hash in the configuration wins over an older change by the client."""

    _SCHEMA = (
        """CREATE TABLE IF NOT EXISTS pin_override (
            token TEXT NOT NULL, who TEXT NOT NULL, hash TEXT NOT NULL,
            replaced TEXT NOT NULL, PRIMARY KEY (token, who))""",
    )

    def __init__(self, token: str, configured: dict[str, str], registry: StateStore) -> None:
        self.token = token
        self.configured = dict(configured)
        self.registry = registry
        registry.ensure(*self._SCHEMA)
        self._override = {
            who: (h, replaced)
            for who, h, replaced in registry.query(
                "SELECT who, hash, replaced FROM pin_override WHERE token=?", (token,))
        }

    def get(self, who: str) -> str | None:
        """The hash ``who``'s PIN is checked against. On a shared store the override is
        read from the store at each check: a PIN changed through another process or
        node is the PIN here too (the copy read at start kept the old PIN working on
        every other node). A store that cannot be read raises StoreError: no PIN is
        checked (a login needs the store for its attempt counter anyway)."""
        base = self.configured.get(who)
        if self.registry.shared:
            rows = self.registry.query(
                "SELECT hash, replaced FROM pin_override WHERE token=? AND who=?",
                (self.token, who))
            if rows:
                self._override[who] = (str(rows[0][0]), str(rows[0][1]))
            else:
                self._override.pop(who, None)
        o = self._override.get(who)
        if o is not None and o[1] == (base or ""):
            return o[0]
        return base

    def set(self, who: str, new_hash: str) -> None:
        replaced = self.configured.get(who) or ""
        self.registry.execute(
            "INSERT OR REPLACE INTO pin_override (token, who, hash, replaced) "
            "VALUES (?, ?, ?, ?)", (self.token, who, new_hash, replaced))
        self._override[who] = (new_hash, replaced)

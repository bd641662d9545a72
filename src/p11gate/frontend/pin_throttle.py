"""PIN attempts counted in the state store, so that every process and node serving a
token shares one counter per identity: an attacker who spreads wrong PINs over N
processes or nodes gets max_pin_failures in a row, not N times as many.

Same rules as :class:`~.pins.PinThrottle` (an attempt takes a slot before its PIN is
checked; at most max_pin_failures failed or in flight in a row; the lock-out doubles),
with the state in the ``pin_throttle`` table. Taking a slot is one conditional UPDATE,
atomic in both engines, so two processes cannot both take the last slot. Slots of a
process that died are given back ``SLOT_TTL`` seconds after the last one was taken.

Fail closed: when the store cannot be read or written, :meth:`begin` raises
CKR_DEVICE_ERROR and no PIN is checked. Ending an attempt is best effort (the store
logs the failure): a slot that could not be given back still counts until it expires,
which errs on the side of fewer attempts.
"""

from __future__ import annotations

import contextlib
import time

from ..state.base import StateStore, StoreError
from .pins import MAX_LOCKOUT, PinThrottle

#: seconds a slot counts without being ended (longer than any login may take)
SLOT_TTL = 120.0
#: how often an attempt waiting for others in flight looks again (they may be in
#: another process, which cannot wake this one)
POLL = 0.02
#: tries of begin() whose refusals the store's row does not bear out (see there)
_TAKES = 3

_LIVE_INFLIGHT = "(CASE WHEN inflight_until < ? THEN 0 ELSE inflight END)"
_DEC = "inflight = CASE WHEN inflight > 0 THEN inflight - 1 ELSE 0 END"


def _stored(who: str) -> str:
    """The key as a text column holds it: PostgreSQL text has no NUL, which the
    backend's own counter key starts with (no identity starts with a backslash)."""
    return who.replace("\x00", "\\x00")


class StoredPinThrottle(PinThrottle):
    def __init__(self, token: str, max_failures: int, lockout: float,
                 store: StateStore) -> None:
        super().__init__(max_failures, lockout)
        self.token = token
        self.store = store
        #: identity key → attempts in flight that the last refused begin() saw
        self._inflight_seen: dict[str, int] = {}

    def _row(self, who: str) -> None:
        self.store.execute("INSERT OR IGNORE INTO pin_throttle (token, who, next_lock) "
                           "VALUES (?, ?, ?)", (self.token, _stored(who), self.lockout))

    def locked_for(self, who: str) -> float:
        rows = self.store.query("SELECT locked_until FROM pin_throttle WHERE token=? AND "
                                "who=?", (self.token, _stored(who)))
        if not rows:
            return 0.0
        return max(0.0, float(rows[0][0]) - time.time())

    def _take_slot(self, who: str, now: float) -> bool:
        return self.store.update(
            f"UPDATE pin_throttle SET inflight = {_LIVE_INFLIGHT} + 1, inflight_until = ? "
            f"WHERE token=? AND who=? AND locked_until <= ? AND fails + {_LIVE_INFLIGHT} < ?",
            (now, now + SLOT_TTL, self.token, _stored(who), now, now, self.max_failures)) == 1

    def _refusal(self, who: str, now: float) -> list[tuple[float, int, int]]:
        return [(float(a), int(b), int(c)) for a, b, c in self.store.query(
            f"SELECT locked_until, {_LIVE_INFLIGHT}, fails FROM pin_throttle "
            "WHERE token=? AND who=?", (now, self.token, _stored(who)))]

    def begin(self, who: str) -> float:
        for _ in range(_TAKES):
            now = time.time()
            if self._take_slot(who, now):
                return 0.0
            rows = self._refusal(who, now)
            if not rows:
                self._row(who)  # the first attempt of this identity on this token
                continue
            locked_until, inflight, fails = rows[0]
            if locked_until > now:
                return locked_until - now
            if fails + inflight >= self.max_failures:
                self._inflight_seen[who] = inflight
                return max(self.lockout, 1.0)
            # Neither locked out nor full: the attempts that filled the slots when the
            # UPDATE was refused have ended since (in another process or node, between
            # the two statements). That refusal is stale: try again, never call it a
            # lock-out (a right PIN would get CKR_PIN_LOCKED with no failure counted).
        # still stale after _TAKES tries (attempts coming and going all the while): as
        # if one were in flight, so that acquire() waits and looks again
        self._inflight_seen[who] = 1
        return max(self.lockout, 1.0)

    async def acquire(self, who: str) -> float:
        while True:
            self._inflight_seen.pop(who, None)
            wait = self.begin(who)
            if wait == 0 or self._inflight_seen.pop(who, 0) == 0:
                return wait
            # as many attempts in flight as may still fail: wait for one to end, here
            # (woken at once) or in another process (seen at the next look)
            await self._wait_for_end(who, POLL)

    def failed(self, who: str) -> None:
        now = time.time()
        with contextlib.suppress(StoreError):
            self._row(who)  # C_SetPIN counts a wrong old PIN without taking a slot
            self.store.update(f"UPDATE pin_throttle SET {_DEC}, fails = fails + 1 "
                              "WHERE token=? AND who=?", (self.token, _stored(who)))
            if self.store.update(
                    "UPDATE pin_throttle SET fails = 0, locked_until = ? + next_lock, "
                    "next_lock = CASE WHEN next_lock * 2 < ? THEN next_lock * 2 ELSE ? END "
                    "WHERE token=? AND who=? AND fails >= ?",
                    (now, MAX_LOCKOUT, MAX_LOCKOUT, self.token, _stored(who), self.max_failures)):
                self.lockouts += 1
        self._wake(who)

    def succeeded(self, who: str) -> None:
        with contextlib.suppress(StoreError):
            self.store.update(f"UPDATE pin_throttle SET {_DEC}, fails = 0, next_lock = ? "
                              "WHERE token=? AND who=?", (self.lockout, self.token, _stored(who)))
        self._wake(who)

    def abandoned(self, who: str) -> None:
        with contextlib.suppress(StoreError):
            self.store.update(f"UPDATE pin_throttle SET {_DEC} WHERE token=? AND who=?",
                              (self.token, _stored(who)))
        self._wake(who)

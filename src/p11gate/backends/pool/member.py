"""One member of a pool: a token on a back end, its bounded pool of logged-in sessions,
its health and its load.

A member is *usable* while it is up and attached to its back end's current instance.
Any transport failure, missed deadline or device-class error marks it down; the pool's
probe brings it back (new control session, login again, fresh session pool, empty
handle cache) when its back end answers again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ...codec import Attribute, ckr, reply_rv
from ...codec import constants as ck
from ...config_select import TokenSelect
from ...errors import BackendUnavailable, DeadlineExceeded, Pkcs11Error
from ..base import Backend
from ..deadlines import SLOW_CALLS
from ..slots import select_slot
from .member_rules import (
    ALIVE_AFTER,
    DEVICE_ERRORS,
    ID,
    INITIAL_LATENCY,
    LIVENESS_PROBES,
    MISSING_TTL,
    RECLAIM_POLL,
    SESSION_GONE,
    MemberDown,
)

log = logging.getLogger("p11gate.pool")
_T = TypeVar("_T")


class Member:
    def __init__(self, index: int, backend: Backend, select: TokenSelect,
                 max_sessions: int) -> None:
        self.index = index
        self.backend = backend
        self.name = backend.name
        self.select = select
        #: sessions this member may have open, control session included
        self.max_sessions = max_sessions
        self.state = "down"
        self.down_reason = "not attached yet"
        #: operations interrupted here and replayed on another member (metrics)
        self.replays = 0
        #: bumps at every attach: leases and handles from an older epoch are dead
        self.epoch = 0
        self.attached_generation = -1
        self.slot: int | None = None
        self.control: int | None = None
        self.control_lock = asyncio.Lock()
        self.idle: list[int] = []
        self.open = 0  # leasable sessions open (the control session not counted)
        self.leased = 0
        self.open_max = 0  # high-water mark of open sessions, control session included
        self.waiting = 0
        self._waiters: collections.deque[asyncio.Future[int | None]] = collections.deque()
        #: session → the operation that holds it between its calls (operations.py)
        self.held: dict[int, Any] = {}
        #: the pool's hook that parks an idle operation and gives its (session, epoch)
        #: back, or None when no operation can give one (operations.take_back)
        self.reclaim: Callable[[Member], tuple[int, int] | None] | None = None
        #: object id → handle on this member (this epoch)
        self.handles: dict[int, int] = {}
        #: handle → object id (this epoch), for find results and new objects
        self.oids: dict[int, int] = {}
        self.missing: dict[int, float] = {}
        self.outstanding = 0
        self.latency = INITIAL_LATENCY  # EWMA of call latency, seconds
        self.last_answer = time.monotonic()
        self.calls = 0
        self.failovers = 0  # calls moved off this member
        self.downs = 0
        #: when it last answered anything, a liveness probe included (monotonic)
        self.last_alive = time.monotonic()
        #: the liveness probe's timer, and whether a probe is under way
        self._liveness: asyncio.TimerHandle | None = None
        self._probing = False
        #: the back end's call_timeout, if it has one (worker and in-process back ends)
        self.call_timeout: float | None = getattr(backend, "call_timeout", None)

    # ------------------------------------------------------------ health

    @property
    def usable(self) -> bool:
        return (self.state == "up" and self.backend.up
                and self.backend.generation == self.attached_generation)

    def score(self) -> float:
        """Lower is better: expected wait for one more call here. The latency estimate
        of a member that answered nothing for a while halves every second: one slow
        spell (a hang, a replay) would otherwise keep it out of rotation for ever, as
        only the calls it gets can correct it."""
        idle = time.monotonic() - self.last_answer
        latency = self.latency if idle < 1.0 else self.latency * 0.5 ** idle
        return (self.outstanding + self.waiting + 1) * latency

    async def attach(self, login: tuple[int, bytes] | None) -> None:
        gen = self.backend.generation
        slot = await select_slot(self.backend, self.select)
        (control,) = await self.backend.call(
            ID["C_OpenSession"], [slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION])
        if login is not None:
            try:
                await self.backend.call(ID["C_Login"], [control, login[0], login[1]])
            except Pkcs11Error as e:
                if e.rv != ckr.USER_ALREADY_LOGGED_IN:
                    raise
        self.epoch += 1
        self.slot, self.control = slot, control
        self.attached_generation = gen
        self.idle.clear()
        self.held.clear()
        self.open = self.leased = 0
        self.open_max = max(self.open_max, 1)
        self.handles.clear()
        self.oids.clear()
        self.missing.clear()
        self.state = "up"
        self.down_reason = ""
        self.latency = INITIAL_LATENCY  # a fresh start: what it did before says nothing
        self.last_alive = time.monotonic()
        while self._waiters:  # waiting from before: the old sessions are gone, retry
            self._wake(None)

    def mark_down(self, reason: str) -> None:
        if self.state == "down":
            return
        self.state = "down"
        self.down_reason = reason
        self.downs += 1
        log.warning("pool member down", extra={"member": self.name, "reason": reason})
        self._fail_waiters()  # whoever waits for a lease here must go elsewhere

    # ------------------------------------------------------------ calls

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """One call on this member; member-level failures become :class:`MemberDown`."""
        if not self.usable:
            raise MemberDown(self.down_reason or "member down")
        self._busy()
        t0 = time.monotonic()
        try:
            reply = await self.backend.call(call_id, args)
        except (BackendUnavailable, TimeoutError, Pkcs11Error) as e:
            raise self._failure(e, call_id, args, t0) from None
        finally:
            self.outstanding -= 1
        self._answered(t0)
        return reply

    async def search(self, session: int, template: list[Any]) -> list[int] | None:
        """A whole search on this member in one round trip where its back end can
        (``Backend.submit_search``); None: search call by call. Failures as :meth:`call`."""
        fut = self._send_now(lambda _c, a: self.backend.submit_search(a[0], a[1]),
                             0, [session, template])
        if fut is None:
            return None
        self._busy()
        t0 = time.monotonic()
        try:
            found = await fut
        except (BackendUnavailable, TimeoutError, Pkcs11Error) as e:
            raise self._failure(e, ID["C_FindObjectsInit"], [session], t0) from None
        finally:
            self.outstanding -= 1
        self._answered(t0)
        return found

    def send(self, call_id: int, args: list[Any],
             then: Callable[[list[Any] | None, BaseException | None], None]) -> None:
        """:meth:`call` in callback style, for the pool's direct path (no coroutine, no
        future of its own): ``then(reply, None)`` or ``then(None, error)`` runs when the
        call ends, the error being :class:`MemberDown` for a member-level failure (as
        :meth:`call` raises it). Raises MemberDown at once when the member cannot take
        the call."""
        inner = self._send_now(self.backend.submit, call_id, args)
        self._busy()
        t0 = time.monotonic()

        def done(f: asyncio.Future[list[Any]]) -> None:
            self.outstanding -= 1
            if f.cancelled():
                then(None, asyncio.CancelledError())
                return
            e = f.exception()
            if e is None:
                self._answered(t0)
                then(f.result(), None)
            elif isinstance(e, (BackendUnavailable, TimeoutError, Pkcs11Error)):
                then(None, self._failure(e, call_id, args, t0))
            else:
                then(None, e)

        inner.add_done_callback(done)

    def send_raw(self, call_id: int, args: list[Any],
                 then: Callable[[bytes | None, BaseException | None], None]) -> bool:
        """:meth:`send` for a reply relayed as bytes (``Backend.submit_raw``): False, and
        nothing sent, when the back end cannot relay this call. A module error in the
        reply body that is a member failure (see :meth:`_failure`) comes as MemberDown;
        any other reply body, errors included, is the reply."""
        inner = self._send_now(self.backend.submit_raw, call_id, args)
        if inner is None:
            return False
        self._busy()
        t0 = time.monotonic()

        def done(f: asyncio.Future[bytes]) -> None:
            self.outstanding -= 1
            if f.cancelled():
                then(None, asyncio.CancelledError())
                return
            e = f.exception()
            if e is not None:
                then(None, self._failure(e, call_id, args, t0) if isinstance(
                    e, (BackendUnavailable, TimeoutError)) else e)
                return
            body = f.result()
            rv = reply_rv(body)
            if rv == ckr.OK:
                self._answered(t0)
            elif isinstance(down := self._failure(Pkcs11Error(rv), call_id, args),
                            MemberDown):
                then(None, down)
                return
            then(body, None)

        inner.add_done_callback(done)
        return True

    def _send_now(self, submit: Callable[[int, list[Any]], _T], call_id: int,
                  args: list[Any]) -> _T:
        """``submit(call_id, args)`` on this member's back end, refused with MemberDown
        when the member cannot take a call (as :meth:`call` refuses it)."""
        if not self.usable:
            raise MemberDown(self.down_reason or "member down")
        try:
            return submit(call_id, args)
        except (BackendUnavailable, TimeoutError) as e:
            raise self._failure(e, call_id, args) from None

    def _answered(self, t0: float) -> None:
        self.calls += 1
        self.last_answer = self.last_alive = time.monotonic()
        self.latency += 0.2 * ((self.last_answer - t0) - self.latency)

    # ------------------------------------------------------------ liveness

    def _busy(self) -> None:
        """One more call under way; the liveness probe's timer runs while any is."""
        self.outstanding += 1
        if self._liveness is None and self.call_timeout is not None:
            self._liveness = asyncio.get_running_loop().call_later(
                self.call_timeout / LIVENESS_PROBES, self._liveness_tick)

    def _liveness_tick(self) -> None:
        """While calls are under way, a member that answered nothing for a probe period
        is asked a C_GetInfo (on another of its threads): a member that answers it is
        not hung, whatever its slow calls do (see :meth:`_failure`). Not a health check:
        the probe's answer or failure changes nothing but ``last_alive``."""
        self._liveness = None
        if self.outstanding <= 0 or self.call_timeout is None or not self.usable:
            return
        period = self.call_timeout / LIVENESS_PROBES
        if not self._probing and time.monotonic() - self.last_alive >= period:
            self._probing = True
            try:
                fut = self.backend.submit(ID["C_GetInfo"], [])
            except Exception:
                self._probing = False
            else:
                fut.add_done_callback(self._probed)
        self._liveness = asyncio.get_running_loop().call_later(period, self._liveness_tick)

    def _probed(self, f: asyncio.Future[list[Any]]) -> None:
        self._probing = False
        if not f.cancelled() and f.exception() is None:
            self.last_alive = time.monotonic()

    def _alive_during(self, t0: float | None) -> bool:
        """Whether the member answered something after a call started at ``t0`` had run
        ALIVE_AFTER of its deadline: then it was not hung while that call was."""
        if t0 is None or self.call_timeout is None:
            return False
        return self.last_alive >= t0 + ALIVE_AFTER * self.call_timeout

    def _failure(self, e: Exception, call_id: int, args: list[Any],
                 t0: float | None = None) -> Exception:
        """What a failed call raises: MemberDown (the member marked down) for a transport
        failure, a missed deadline or a device-class error, else the module's error.

        A missed deadline marks the member down (its worker was killed under the call,
        or a thread is hung in it), and moves the call to another member only when the
        member may have been hung. How long a call takes is largely the client's to
        choose (data size, mechanism, key size), and a slow call retried on each member
        in turn would kill every worker, every tenant's sessions on the pool with them.
        So the call is not retried, and the client gets CKR_DEVICE_ERROR (as from a
        plain token), when:

        * it is a key generation (its keygen deadline): slow by nature;
        * the member answered something (another call, the liveness probe) after the
          call had run ALIVE_AFTER of its deadline: a member that answers is not hung,
          and a hung one answers nothing from the moment it hangs (a call sent before
          that was answered before it, unless it was slow itself).

        A member whose worker process was stopped (SIGSTOP, a debugger) when the deadline
        passed was hung beyond doubt: plain MemberDown, the call fails over as from a
        dead member. Otherwise MemberDown(deadline=True): the caller retries it on one
        more member at most (:func:`deadline_strike`)."""
        if isinstance(e, (BackendUnavailable, TimeoutError)):
            self.mark_down(f"transport: {e}")
            if isinstance(e, (DeadlineExceeded, TimeoutError)):
                if call_id in SLOW_CALLS:
                    return Pkcs11Error(ckr.DEVICE_ERROR, f"member {self.name}: key "
                                       "generation missed its deadline (not retried on "
                                       "another member)")
                if getattr(self.backend, "stopped_at_deadline", False):
                    return MemberDown(str(e))  # its worker was stopped: hung, no doubt
                if self._alive_during(t0):
                    return Pkcs11Error(ckr.DEVICE_ERROR, f"member {self.name}: a call "
                                       "missed its deadline while the member answered "
                                       "others (not retried on another member)")
                return MemberDown(str(e), deadline=True)
            return MemberDown(str(e))
        if isinstance(e, Pkcs11Error) and (e.rv in DEVICE_ERRORS or (
                e.rv in SESSION_GONE and args and args[0] == self.control)):
            self.mark_down(f"device: {ckr.name(e.rv)}")
            return MemberDown(ckr.name(e.rv))
        return e

    # ------------------------------------------------------------ session pool

    async def lease(self) -> tuple[int, int]:
        """A logged-in session of this member, for one call or one operation: (session,
        epoch). Waits (first come, first served) while all sessions are leased; raises
        MemberDown if the member goes down meanwhile.

        Sessions held by operations between their calls are not a client's to keep: a
        client that starts operations and never ends them would otherwise hold every
        session of every member, and every other client's calls would wait for ever. So
        a caller that finds no session takes one back from an idle operation (see
        operations.take_back), at once and again every RECLAIM_POLL while it waits."""
        first = False  # a waiter woken for a freed slot goes before those still queued
        while True:
            if not self.usable:
                raise MemberDown(self.down_reason or "member down")
            may = first or not self._waiters
            if self.idle and may:
                self.leased += 1
                return self.idle.pop(), self.epoch
            if self.open + 1 < self.max_sessions and may:
                return await self._open_one()
            if may and await self._take_back():
                continue  # a slot is free now
            first = False
            fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            epoch = self.epoch
            self._waiters.append(fut)
            self.waiting += 1
            try:
                while not fut.done():
                    await asyncio.wait((fut,), timeout=RECLAIM_POLL)
                    if not fut.done() and self.usable:
                        await self._take_back()  # the slot goes to the first waiter
                session = fut.result()
            except BaseException:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled() and fut.exception() is None \
                        and (got := fut.result()) is not None and epoch == self.epoch:
                    self.leased += 1  # handed over as this waiter gave up: pass it on
                    self.give_back(got, epoch)
                raise
            finally:
                self.waiting -= 1
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if session is not None:
                self.leased += 1
                return session, self.epoch
            # None: a slot was freed (a session closed) or the pool was reset: try again,
            # ahead of the queue
            first = True

    async def _take_back(self) -> bool:
        """Take a session back from an idle operation (parked or ended by the pool's
        hook), close it on the module and free its slot: True if one was freed."""
        taken = self.reclaim(self) if self.reclaim is not None else None
        if taken is None:
            return False
        session, epoch = taken
        # closed before the slot is free: the member never has more than max_sessions
        with contextlib.suppress(Exception):
            await self.backend.call(ID["C_CloseSession"], [session])
        self.give_back(session, epoch, broken=True)
        return True

    def has_room(self) -> bool:
        """Whether a lease here would be served without waiting (nobody queues, and a
        session is idle or may be opened)."""
        return not self._waiters and (bool(self.idle) or self.open + 1 < self.max_sessions)

    async def _open_one(self) -> tuple[int, int]:
        self.open += 1
        epoch = self.epoch
        try:
            (session,) = await self.call(
                ID["C_OpenSession"], [self.slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION])
        except BaseException:
            if epoch == self.epoch:
                self.open -= 1
                self._wake(None)
            raise
        if epoch != self.epoch:
            raise MemberDown("member restarted while opening a session")
        self.leased += 1
        self.open_max = max(self.open_max, self.open + 1)
        return int(session), epoch

    def _wake(self, session: int | None) -> bool:
        """Hand ``session`` (or a retry, for None) to the first waiter; False if none."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(session)
                return True
        return False

    def lease_now(self) -> tuple[int, int] | None:
        """A lease without waiting: an idle session when nobody queues for one, else
        None (the caller takes the waiting path, :meth:`lease`)."""
        if self.idle and not self._waiters and self.usable:
            self.leased += 1
            return self.idle.pop(), self.epoch
        return None

    async def release(self, session: int, epoch: int, broken: bool = False) -> None:
        if self.give_back(session, epoch, broken):
            with contextlib.suppress(Exception):
                await self.backend.call(ID["C_CloseSession"], [session])

    def give_back(self, session: int, epoch: int, broken: bool = False) -> bool:
        """The synchronous part of :meth:`release`; True when ``session`` is broken and
        must still be closed on the module."""
        if epoch != self.epoch:
            return False  # from a dead instance: nothing to give back
        self.leased -= 1
        if broken:
            self.open -= 1
            self._wake(None)
            return True
        if not self._wake(session):
            self.idle.append(session)
        return False

    def _fail_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(MemberDown(self.down_reason or "member down"))

    # ------------------------------------------------------------ objects

    async def find_by_identity(self, oid: int, template: list[Attribute]) -> int | None:
        """The handle of object ``oid`` on this member (found by its identity, cached), or
        None when the member does not have it."""
        h = self.handles.get(oid)
        if h is not None:
            return h
        seen = self.missing.get(oid)
        if seen is not None and time.monotonic() - seen < MISSING_TTL:
            return None
        async with self.control_lock:
            found: Any = []
            try:
                await self.call(ID["C_FindObjectsInit"], [self.control, template])
                (found,) = await self.call(ID["C_FindObjects"], [self.control, 2])
            finally:
                with contextlib.suppress(Pkcs11Error, MemberDown):
                    await self.call(ID["C_FindObjectsFinal"], [self.control])
        if not isinstance(found, list) or not found:
            self.missing[oid] = time.monotonic()
            return None
        self.handles[oid] = int(found[0])
        self.oids[int(found[0])] = oid
        return int(found[0])

    def forget_handle(self, oid: int) -> None:
        h = self.handles.pop(oid, None)
        if h is not None:
            self.oids.pop(h, None)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name, "state": self.state, "down_reason": self.down_reason,
            "outstanding": self.outstanding, "latency_ms": round(self.latency * 1000, 3),
            "calls": self.calls, "failovers": self.failovers, "downs": self.downs,
            "sessions_open": self.open + (1 if self.control is not None else 0),
            "sessions_open_max": self.open_max, "sessions_leased": self.leased,
            "waiting_for_session": self.waiting, "max_sessions": self.max_sessions,
            "backend_generation": self.backend.generation,
        }

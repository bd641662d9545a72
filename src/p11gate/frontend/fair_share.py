"""A fair share of each backend per identity.

A backend serves a few calls at once (``threads``). Without a share, one tenant that
starts that many slow calls (key generation) holds every thread, and every other
client's calls wait behind them until a deadline kills the worker. Here each identity
(``Identity.key``: the uid, the certificate subject) may have at most
``max_calls_per_identity`` calls in flight on a backend; its further calls wait in a
FIFO queue of their own (bounded by ``max_queued_per_identity``, beyond which the call
is refused with CKR_FUNCTION_FAILED) while other identities' calls go straight on. An
identity's queued calls start in the order they came, once it is under its share again
and the backend has a free place (below).

The share per identity does not stop several identities together: two tenants each at
their share (3 + 3 on 4 threads) would hand the backend more calls than it has threads,
the surplus would wait in the worker's (or the in-process executor's) queue, where the
wait counts against ``call_timeout``: a bystander's signature waits behind everybody's
calls, and a missed deadline kills the worker with every session on it. So on a plain
backend all identities together have at most its capacity in flight (``capacity``: a
module's ``threads``, a KMIP backend's connections; the soft token, whose calls run on
the event loop, has none). Beyond, a call waits in its identity's queue here, and each
call that ends gives its place to the queued identities: one with nothing in flight
first (a bystander waits for about one call's end, not for everybody's queue), then the
others in turn (round robin, one call each). A call's deadline starts when it is handed
to the backend, so a wait here is never taken for a hung module. What is not bounded: a
queued call waits as long as the calls ahead of it run (the identity's own, and one
call per queued identity per turn), and the client's own deadline is the client's.

Key and parameter generations (``SLOW_CALLS``) moreover never take a backend's last
thread: at most ``threads - 1`` of them run at once in all (at least one); beyond, a
generation waits in its identity's queue (the identity's later calls behind it) until
any identity's generation ends.

Cost on the hot path, under the share and the capacity: one dict lookup, two counters,
one done-callback; no task and no coroutine. Only a call that has to wait allocates
anything, and only while some call waits does an ending call look at the queues.

Pools: the share applies to the pool token as a whole (the frontend's view of the
backend), and only to the calls that are slow by nature (key and parameter generation,
``backends.deadlines.SLOW_CALLS``). A pool leases a member session to an operation from
its Init to its end, and a call may wait inside the pool for a lease; counting such a
wait as a call in flight would let an identity's C_SignInit calls, waiting for leases,
hold its share while the C_Sign calls that would free those leases wait in its queue
behind them: a deadlock. Generation holds a lease only while it runs. An identity may
have as many generations in flight on a pool as the shares of its usable members add up
to (each member backend counted once), recomputed at every call, so the share shrinks
with the pool's capacity when members go down. The pool's own bound on member sessions
(``max_sessions_per_member``) bounds everything else, and there is no capacity bound
across identities on a pool token (its calls wait for member sessions in the pool, in
the order they came).

Only calls forwarded for a client session pass through here. The gateway's own calls
(attaching tokens, logins, reading an object's identity, pool replication), the
session-less ones and a pool's calls to its member backends are short or bounded by the
pool, and are not counted: they may still run beside the capacity's calls, which is why
the worker and the in-process executor keep queues of their own.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..backends.base import Backend
from ..backends.deadlines import SLOW_CALLS
from ..backends.pool.pool import PoolBackend
from ..codec import ckr
from ..config import BackendConfig, Config
from ..errors import BackendUnavailable, Pkcs11Error

log = logging.getLogger("p11gate.share")

#: at most one "queue full" log record per identity and backend in this many seconds
_LOG_EVERY = 10.0
#: the capacity of a backend whose calls in flight are not bounded in all
_UNBOUNDED = 1 << 62


class Owner(Protocol):
    """Who queued a call: a queued call of a connection that closed meanwhile is
    dropped instead of started."""

    closed: bool


class _Waiting:
    __slots__ = ("args", "call_id", "generation", "out", "owner")

    def __init__(self, call_id: int, args: list[Any], generation: int, owner: Owner | None,
                 out: asyncio.Future[list[Any]]) -> None:
        self.call_id = call_id
        self.args = args
        self.generation = generation
        self.owner = owner
        self.out = out


class FairShare:
    """One backend's share book: calls in flight per identity and in all, and the
    identities' queues, served in turn."""

    def __init__(self, backend: Backend, limit: int, max_queued: int,
                 pool_limit: Callable[[], int] | None = None, threads: int = 0,
                 capacity: int | None = None) -> None:
        self.backend = backend
        self.limit = max(1, limit)
        #: generations in flight in all, and how many may be (0: no bound; pools, whose
        #: members each have their own share book, are bounded per member lease)
        self._slow = 0
        self._slow_cap = max(1, threads - 1) if threads and pool_limit is None else 0
        #: counted calls in flight in all, and how many may be (``capacity``: the
        #: backend's threads; default ``threads``; 0 or a pool: no bound)
        self._total = 0
        cap = threads if capacity is None else capacity
        self.capacity = max(1, cap) if cap and pool_limit is None else 0
        self._cap = self.capacity or _UNBOUNDED
        #: a pool's share depends on which members are usable now
        self._pool_limit = pool_limit
        self.max_queued = max_queued
        self._active: dict[str, int] = {}
        self._queues: dict[str, collections.deque[_Waiting]] = {}
        #: the identities with calls queued, in the order they get the next free place
        self._turns: collections.deque[str] = collections.deque()
        #: counters for status: calls that had to wait, calls refused (queue full),
        #: calls that waited for the backend's capacity (not their identity's share)
        self.queued = 0
        self.refused = 0
        self.saturated = 0
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------ submitting

    def submit(self, who: str, call_id: int, args: list[Any],
               owner: Owner | None = None) -> asyncio.Future[list[Any]]:
        """Like ``Backend.submit``: start the call now if ``who`` is under its share,
        the backend under its capacity and ``who`` has nothing queued, else queue it.
        Raises BackendUnavailable (backend down) or Pkcs11Error (queue full)
        synchronously."""
        n = self._active.get(who, 0)
        slow = call_id in SLOW_CALLS
        if self._pool_limit is None:
            if (n >= self.limit or self._total >= self._cap
                    or (slow and self._slow_full()) or (self._queues and who in self._queues)):
                return self._enqueue(who, call_id, args, owner, n)
        elif not slow:
            return self.backend.submit(call_id, args)  # see the module docstring: pools
        elif n >= self._pool_limit() or who in self._queues:
            # (a pool's share can grow while calls wait: those go first)
            return self._enqueue(who, call_id, args, owner, n)
        fut = self.backend.submit(call_id, args)
        self._active[who] = n + 1
        self._total += 1
        if slow:
            self._slow += 1
        fut.add_done_callback(functools.partial(self._release, who, slow))
        return fut

    def submit_raw(self, who: str, call_id: int,
                   args: list[Any]) -> asyncio.Future[bytes] | None:
        """Like ``Backend.submit_raw``; None when the call must go through
        :meth:`submit` instead (not relayable, or it has to queue). Counted as
        :meth:`submit` counts."""
        if self._pool_limit is not None:
            # as in submit: a pool's calls other than SLOW_CALLS are not counted here
            return None if call_id in SLOW_CALLS else self.backend.submit_raw(call_id, args)
        n = self._active.get(who, 0)
        if (n >= self.limit or self._total >= self._cap
                or (call_id in SLOW_CALLS and self._slow_cap)
                or (self._queues and who in self._queues)):
            return None  # (a generation is never relayed raw: counted in submit)
        raw = self.backend.submit_raw(call_id, args)
        if raw is None:
            return None
        self._active[who] = n + 1
        self._total += 1
        raw.add_done_callback(functools.partial(self._release, who, False))
        return raw

    def _enqueue(self, who: str, call_id: int, args: list[Any],
                 owner: Owner | None, n: int) -> asyncio.Future[list[Any]]:
        if not self.backend.up:
            raise BackendUnavailable(f"backend {self.backend.name} is restarting")
        q = self._queues.get(who)
        if len(q or ()) >= self.max_queued:
            self.refused += 1
            self._log_refusal(who)
            raise Pkcs11Error(ckr.FUNCTION_FAILED, "fair share: too many calls queued")
        if q is None:
            q = self._queues[who] = collections.deque()
            # an identity with nothing in flight is served first (a bystander waits
            # for one call's end, not for everyone's turn); the others in turn
            if n == 0:
                self._turns.appendleft(who)
            else:
                self._turns.append(who)
        out: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        # handles in ``args`` belong to the backend instance of now: checked at start
        q.append(_Waiting(call_id, args, self.backend.generation, owner, out))
        self.queued += 1
        if n < self.limit and self._total >= self._cap:
            self.saturated += 1
        return out

    def _log_refusal(self, who: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(who, -_LOG_EVERY) < _LOG_EVERY:
            return
        self._logged[who] = now
        if len(self._logged) > 4096:  # forget old entries rather than grow
            self._logged = {who: now}
        log.warning("fair share: call refused, queue full", extra={
            "backend": self.backend.name, "identity": who, "in_flight": self._active.get(who),
            "max_queued": self.max_queued, "rv": "CKR_FUNCTION_FAILED"})

    # ------------------------------------------------------------ completion

    def _slow_full(self) -> bool:
        return bool(self._slow_cap) and self._slow >= self._slow_cap

    def _release(self, who: str, slow: bool, _done: asyncio.Future[Any]) -> None:
        """One of ``who``'s calls ended: its place goes to the queued calls, in turn."""
        n = self._active.get(who, 1) - 1
        if n > 0:
            self._active[who] = n
        else:
            self._active.pop(who, None)
        self._total -= 1
        if slow:
            self._slow -= 1
        if self._queues:
            self._dispatch()

    def _dispatch(self) -> None:
        """Start queued calls while there is room: the identity whose turn it is starts
        its oldest call if it is under its share (and, for a generation, a generation's
        place is free), then goes to the back of the turns; one that cannot start now
        is passed over (to the back too) until every queued identity has been asked."""
        turns, queues = self._turns, self._queues
        limit = self.limit if self._pool_limit is None else self._pool_limit()
        passed = 0
        while turns and self._total < self._cap and passed < len(turns):
            who = turns[0]
            q = queues[who]
            w = q[0]
            if (self._active.get(who, 0) >= limit
                    or (w.call_id in SLOW_CALLS and self._slow_full())):
                turns.rotate(-1)
                passed += 1
                continue
            q.popleft()
            started = self._start(who, w)
            if not q:
                turns.popleft()
                del queues[who]
            elif started:
                turns.rotate(-1)
            # (a call dropped at its start costs its identity no turn)
            if started:
                passed = 0

    def _start(self, who: str, w: _Waiting) -> bool:
        out = w.out
        if out.done():  # cancelled while waiting
            return False
        if w.owner is not None and w.owner.closed:
            out.set_exception(BackendUnavailable("client gone while its call was queued"))
            return False
        if w.generation != self.backend.generation:
            # the backend restarted while the call waited: its handles are dead
            out.set_exception(BackendUnavailable("backend restarted while the call was queued"))
            return False
        try:
            # the call's deadline (call_timeout) starts here, not when it was queued
            inner = self.backend.submit(w.call_id, w.args)
        except BackendUnavailable as e:
            out.set_exception(e)
            return False
        slow = w.call_id in SLOW_CALLS and self._pool_limit is None
        self._active[who] = self._active.get(who, 0) + 1
        self._total += 1
        if slow:
            self._slow += 1
        inner.add_done_callback(functools.partial(self._finished, who, slow, out))
        return True

    def _finished(self, who: str, slow: bool, out: asyncio.Future[list[Any]],
                  inner: asyncio.Future[list[Any]]) -> None:
        if not out.done():
            if inner.cancelled():
                out.cancel()
            elif (exc := inner.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(inner.result())
        self._release(who, slow, inner)

    def drop_queued(self, owner: Owner) -> int:
        """A client hung up: its calls still waiting are failed, never started."""
        dropped = 0
        for who, q in list(self._queues.items()):
            keep = collections.deque(w for w in q if w.owner is not owner)
            if len(keep) == len(q):
                continue
            for w in q:
                if w.owner is owner and not w.out.done():
                    w.out.set_exception(BackendUnavailable("client gone"))
            dropped += len(q) - len(keep)
            if keep:
                self._queues[who] = keep
            else:
                del self._queues[who]
        if dropped:
            self._turns = collections.deque(w for w in self._turns if w in self._queues)
            if self._queues:  # a generation or share no longer blocked behind them
                self._dispatch()
        return dropped

    # ------------------------------------------------------------ status

    def in_flight(self, who: str) -> int:
        return self._active.get(who, 0)

    def waiting(self, who: str) -> int:
        return len(self._queues.get(who, ()))

    @property
    def total_in_flight(self) -> int:
        return self._total

    def describe(self) -> dict[str, Any]:
        limit = self.limit if self._pool_limit is None else self._pool_limit()
        return {"backend": self.backend.name, "max_calls_per_identity": limit,
                "max_queued_per_identity": self.max_queued,
                "max_calls_in_flight": self.capacity or None,
                "in_flight_total": self._total,
                "in_flight": dict(self._active),
                "waiting": {k: len(v) for k, v in self._queues.items()},
                "queued_total": self.queued, "refused_total": self.refused,
                "saturated_total": self.saturated}


class FairShares:
    """The share book of every backend and pool the gateway serves tokens from."""

    def __init__(self, cfg: Config, served: dict[str, Backend]) -> None:
        self._by_backend: dict[Backend, FairShare] = {}
        for name, backend in served.items():
            confs = list(member_backends(cfg, name))
            if not confs:
                continue
            limit = min(b.calls_per_identity for b in confs)
            queued = min(b.max_queued_per_identity for b in confs)
            pool_limit = None
            if isinstance(backend, PoolBackend):
                pool_limit = functools.partial(self._pool_share, backend)
            threads = min(b.threads for b in confs)
            self._by_backend[backend] = FairShare(backend, limit, queued, pool_limit,
                                                  threads, capacity(confs[0]))

    def _pool_share(self, pool: PoolBackend) -> int:
        """The shares of the pool's usable member backends, added up (at least 1)."""
        live = {m.backend for m in pool.members if m.usable}
        return max(1, sum(self._by_backend[b].limit for b in live if b in self._by_backend))

    def of(self, backend: Backend) -> FairShare:
        share = self._by_backend.get(backend)
        if share is None:  # a backend made after start: the safe default
            share = self._by_backend[backend] = FairShare(backend, 1, 64)
        return share

    def submit(self, backend: Backend, who: str, call_id: int, args: list[Any],
               owner: Owner | None = None) -> asyncio.Future[list[Any]]:
        return self.of(backend).submit(who, call_id, args, owner)

    def submit_raw(self, backend: Backend, who: str, call_id: int,
                   args: list[Any]) -> asyncio.Future[bytes] | None:
        return self.of(backend).submit_raw(who, call_id, args)

    def drop_queued(self, owner: Owner) -> None:
        for share in self._by_backend.values():
            share.drop_queued(owner)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._by_backend.values()]


def capacity(b: BackendConfig) -> int:
    """How many calls a plain backend serves at once: a module's threads, a KMIP
    backend's connections; 0 for the soft token (its calls run on the event loop, or
    briefly in threads of its own)."""
    if b.type == "kmip":
        return b.kmip.pool_size if b.kmip is not None else 0
    if b.type == "soft":
        return 0
    return b.threads


def member_backends(cfg: Config, name: str) -> Iterable[BackendConfig]:
    """The [[backend]] configurations behind a served name: the backend itself, or
    each member of a pool."""
    for b in cfg.backend:
        if b.name == name:
            yield b
            return
    for p in cfg.pool:
        if p.name == name:
            for m in p.members:
                yield cfg.backend_named(m.backend)
            return

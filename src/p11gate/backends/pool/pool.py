"""A pool as a back end: logical sessions over leased member sessions, object ids over
per-member handles, load balancing and failover.

The frontend sees one slot (0), session handles that are the pool's logical sessions and
object handles that are the pool's object ids. Each call is routed:

* slot and token queries go to any usable member;
* C_Login/C_Logout go to every member (and to members that join later);
* an operation (``*Init`` … final, a find) leases one member session for its duration;
  its Update data is kept (up to ``replay_buffer``) so that it can be replayed on
  another member when its member fails mid-way;
* any other call leases a session for that one call;
* a call that fails for a member-level reason (transport, deadline, device error) is
  retried on the next-best member, invisibly to the client.

Members are chosen by expected wait: (outstanding + queued + 1) × measured latency.

This module holds :class:`PoolBackend`: its state, its life cycle, the dispatch of each
call and the routing every path shares (candidates, pinning, object ids to handles).
The paths themselves are in their own modules: direct.py (the direct path),
single_calls.py, operations.py, finds.py, pool_wide_calls.py (queries, login, PINs);
identities.py gives new objects their ids, probing.py runs the probe loop and
status.py reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

from ...codec import Mechanism, Null, ckr
from ...codec import constants as ck
from ...codec.call_table import PLANS
from ...codec.values import HandleParam, KyberParams
from ...errors import BackendUnavailable, Pkcs11Error
from ...state.base import StateStore
from ..base import Backend
from . import status
from .config import PoolConfig
from .direct import LOOK_UP, start_direct, start_direct_raw
from .finds import find_init, hidden
from .intents import note_doubtful
from .member import ID, Member
from .objects import ObjectIds
from .operations import context_login, continue_op, end_op, start_op, take_back
from .pool_wide_calls import any_member, login_all, logout_all, on_every_member
from .probing import probe_loop, probe_once
from .reconcile import CREATING, Reconciler
from .replication import Replicator
from .routes import (
    ANSWERED_HERE,
    DIRECT,
    INIT_CALLS,
    OP_CALLS,
    SLOT_CALLS,
    UNSUPPORTED,
)
from .session_objects import destroy_session_objects
from .session_rules import (
    CREATE_TEMPLATES,
    OBJECT_WRITE_CALLS,
    check_read_only,
)
from .single_calls import single

if TYPE_CHECKING:
    from .operations import _Op

log = logging.getLogger("p11gate.pool")


class _Session:
    __slots__ = ("find", "flags", "objects", "op", "pin")

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.op: _Op | None = None
        self.find: list[int] | None = None
        #: session objects this session made: destroyed when it closes (PKCS#11)
        self.objects: set[int] = set()
        #: the member holding them: the session's calls go there (None: any member)
        self.pin: int | None = None


class PoolBackend(Backend):
    def __init__(self, cfg: PoolConfig, backends: dict[str, Backend],
                 registry: StateStore) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.generation = 1  # logical sessions and object ids outlive any member
        self.members = [Member(i, backends[m.backend], m.select, cfg.max_sessions_per_member)
                        for i, m in enumerate(cfg.members)]
        for member in self.members:
            member.reclaim = take_back
        self.objects = ObjectIds(cfg.name, registry)
        self.sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)
        self._login: tuple[int, bytes] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._rr = itertools.count()
        self.failovers = 0
        self.replays = 0
        self.replicator = Replicator(self) if cfg.replication == "gateway" else None
        # a call may land on any member: a raw vendor parameter passes only where every
        # member's operator trusts it (the intersection of their lists)
        self.raw_parameter_mechanisms = frozenset.intersection(
            *(m.backend.raw_parameter_mechanisms for m in self.members))
        #: gateway replication: creations recorded as intents first, reconciled after
        #: a crash (see reconcile.py)
        self.reconciler = Reconciler(self) if self.replicator is not None else None
        #: the direct path's follow-ups (a failover, a broken session's close)
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ life cycle

    @property
    def up(self) -> bool:
        return any(m.usable for m in self.members)

    @property
    def logged_in(self) -> bool:
        """A client logged the pool in: members attach logged in, private objects show."""
        return self._login is not None

    async def start(self) -> None:
        await probe_once(self)
        self._probe_task = asyncio.get_running_loop().create_task(probe_loop(self))
        if not self.up:
            log.error("pool has no usable member yet; probing",
                      extra={"pool": self.name,
                             "members": {m.name: m.down_reason for m in self.members}})

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(BaseException):
                await self._probe_task
        self._forget_pin()

    async def wait_up(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.up and loop.time() < end:
            await asyncio.sleep(0.05)
        return self.up

    def _forget_pin(self) -> None:
        self._login = None

    def log_stats(self) -> None:
        """One log record with each member's state and load (the `status` figures)."""
        status.log_stats(self)

    def describe(self) -> dict[str, Any]:
        return status.describe(self)

    def _member_named(self, name: str) -> str:
        return next((m.state for m in self.members if m.name == name), "unknown")

    # ------------------------------------------------------------ routing

    def _candidates(self, tried: set[int], pinned: int | None) -> list[Member]:
        """Usable members, best first. Members whose expected wait is within 1.5× of the
        best are taken in turn, so that even one client's sequential operations spread
        over equivalent members instead of sticking to the fastest one."""
        ms = [m for m in self.members if m.usable and m.index not in tried
              and (pinned is None or m.index == pinned)]
        if len(ms) < 2:
            return ms
        # each score once (a clock read each), ties kept in member order
        scored = sorted([(m.score(), m.index, m) for m in ms], key=lambda t: t[:2])
        limit = scored[0][0] * 1.5
        ordered = [m for _, _, m in scored]
        n = sum(1 for sc, _, _ in scored if sc <= limit)
        k = next(self._rr) % n
        out = ordered[k:n] + ordered[:k] + ordered[n:]
        # a member whose sessions are all leased comes after those with a free one: a
        # lease there waits (or takes one back from an idle operation) needlessly
        return [m for m in out if m.has_room()] + [m for m in out if not m.has_room()]

    def _pinned_member(self, call_id: int, args: list[Any]) -> int | None:
        """Session objects, and keys that could not be copied, live on one member: calls
        that use one must go there."""
        for oid in self._oids_in(call_id, args):
            so = self.objects.sessions.get(oid)
            if so is not None:
                return so.member
            name = self.objects.pinned.get(oid)
            if name is not None:
                return next(m.index for m in self.members if m.name == name)
        return None

    def _unavailable(self, pinned: int | None, lacking: bool, what: str,
                     oids: list[int] | None = None) -> Pkcs11Error:
        if pinned is not None:
            m = self.members[pinned]
            log.warning("object pinned to a member that is down",
                        extra={"pool": self.name, "member": m.name, "reason": m.down_reason})
            return Pkcs11Error(ckr.DEVICE_ERROR,
                               f"{what} lives only on member {m.name}, which is down")
        if lacking:
            if any(o in self.objects.stale for o in oids or ()):
                return Pkcs11Error(ckr.DEVICE_ERROR, f"{what} is up to date only on "
                                                     "members that are down")
            return Pkcs11Error(ckr.OBJECT_HANDLE_INVALID, f"{what}: on no usable member")
        return BackendUnavailable(f"pool {self.name}: no member could serve the call")

    def _session_pin(self, s: _Session | None, call_id: int, args: list[Any]) -> int | None:
        """Where a call must run: the member of the objects it names, else the member of
        its session's session objects (PKCS#11: one application sees them all)."""
        pinned = self._pinned_member(call_id, args)
        # only calls naming no object: token objects are on every member
        if pinned is None and s is not None and s.pin is not None \
                and not self._oids_in(call_id, args):
            if not any(o in self.objects.sessions for o in s.objects):
                s.pin = None  # they died with their member instance, or were destroyed
            pinned = s.pin
        return pinned

    def _failed_over(self, m: Member, call_id: int, reason: str) -> None:
        if call_id in CREATING:
            note_doubtful(m)  # its part of the creation may have been made
        m.failovers += 1
        self.failovers += 1
        log.warning("pool failover", extra={"pool": self.name, "member": m.name,
                                            "call_id": call_id, "reason": reason})

    @staticmethod
    def _oids_in(call_id: int, args: list[Any]) -> list[int]:
        plan = PLANS[call_id]
        out = [args[p] for p in plan.object_args
               if not (args[p] == 0 and plan.optional_objects)]
        if len(args) > 1 and isinstance(args[1], Mechanism):
            p = args[1].param
            if isinstance(p, HandleParam):
                out.append(p.handle)
            elif isinstance(p, KyberParams) and p.secret_handle:
                out.append(p.secret_handle)
        return out

    async def _handle_on(self, m: Member, oid: int) -> int | None:
        h = self.handle_known(m, oid)
        if h != LOOK_UP:
            return h
        return await m.find_by_identity(oid, ObjectIds.template(self.objects.by_oid[oid]))

    def handle_known(self, m: Member, oid: int) -> int | None:
        """``m``'s handle of object ``oid`` as far as it is known now: the handle, None
        when ``m`` must not be used for it, LOOK_UP when it must be found on ``m`` first.
        Raises CKR_OBJECT_HANDLE_INVALID for an id that names no object."""
        so = self.objects.sessions.get(oid)
        if so is not None:
            return so.handle if so.member == m.index and so.epoch == m.epoch else None
        key = self.objects.by_oid.get(oid)
        if key is None or oid in self.objects.destroyed or hidden(self, key):
            raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID)
        pinned = self.objects.pinned.get(oid)
        if pinned is not None and pinned != m.name:
            return None
        if self.objects.is_stale(oid, m.name):
            return None  # its copy is missing or out of date: never a wrong object
        h = m.handles.get(oid)
        return LOOK_UP if h is None else h

    async def translate(self, m: Member, call_id: int, args: list[Any]) -> list[Any] | None:
        """``args`` with object ids replaced by ``m``'s handles; None if ``m`` lacks one."""
        margs = list(args)
        for p in PLANS[call_id].object_args:
            if margs[p] == 0:  # CK_INVALID_HANDLE names no object: the module answers it
                continue  # (optional arguments; the gateway's probe of what a module refuses)
            h = await self._handle_on(m, margs[p])
            if h is None:
                return None
            margs[p] = h
        if len(margs) > 1 and isinstance(margs[1], Mechanism):
            mech = margs[1]
            p = mech.param
            if isinstance(p, HandleParam):
                h = await self._handle_on(m, p.handle)
                if h is None:
                    return None
                margs[1] = Mechanism(mech.type, HandleParam(h))
            elif isinstance(p, KyberParams) and p.secret_handle:
                h = await self._handle_on(m, p.secret_handle)
                if h is None:
                    return None
                margs[1] = Mechanism(mech.type, p._replace(secret_handle=h))
        return margs


    # ------------------------------------------------------------ the Backend call

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        """The frontend's hot path: answers the pool keeps and direct calls (see
        direct.py) start without a task; everything else runs :meth:`call`."""
        if call_id in ANSWERED_HERE:
            out: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            try:
                out.set_result(self._answer_here(call_id, args))
            except Pkcs11Error as e:
                out.set_exception(e)
            return out
        if call_id in DIRECT:
            fut = start_direct(self, call_id, args)
            if fut is not None:
                return fut
        return asyncio.ensure_future(self.call(call_id, args))

    def submit_raw(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes] | None:
        """A relayable direct call (C_GenerateRandom, C_SeedRandom) relayed as the
        member's reply bytes: no decoding and re-encoding in the gateway."""
        if call_id in DIRECT and PLANS[call_id].relayable:
            return start_direct_raw(self, call_id, args)
        return None

    def _answer_here(self, call_id: int, args: list[Any]) -> list[Any]:
        if call_id == ID["C_GetSlotList"]:
            return [[0]] if args[1] >= 1 else [Null(1)]
        s = self.sessions.get(args[0])
        if s is None:
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        if call_id == ID["C_FindObjects"]:
            n = args[1]
            if n == 0:  # the module gets no array: SoftHSM answers so, before the rest
                raise Pkcs11Error(ckr.ARGUMENTS_BAD)
            if s.find is None:
                raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
            out, s.find = s.find[:n], s.find[n:]
            return [out]
        # C_FindObjectsFinal
        if s.find is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        s.find = None
        return []

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        if call_id in ANSWERED_HERE:
            return self._answer_here(call_id, args)
        if call_id in SLOT_CALLS:
            if args[0] != 0:
                raise Pkcs11Error(ckr.SLOT_ID_INVALID)
            return await any_member(self, call_id, args)
        if call_id == ID["C_OpenSession"]:
            if args[0] != 0:
                raise Pkcs11Error(ckr.SLOT_ID_INVALID)
            if not self.up:
                raise BackendUnavailable(f"pool {self.name}: no member up")
            h = next(self._ids)
            self.sessions[h] = _Session(args[1])
            return [h]
        if call_id == ID["C_CloseAllSessions"]:
            for h in list(self.sessions):
                await self._close(h)
            return []
        s = self.sessions.get(args[0])
        if s is None:
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        if call_id == ID["C_CloseSession"]:
            await self._close(args[0])
            return []
        if call_id == ID["C_Login"] and args[1] == ck.CKU_CONTEXT_SPECIFIC:
            return await context_login(self, s, args)
        if call_id in (ID["C_Login"], ID["C_LoginUser"]):
            return await login_all(self, call_id, args)
        if call_id == ID["C_Logout"]:
            return await logout_all(self)
        if call_id in (ID["C_InitPIN"], ID["C_SetPIN"]):
            return await on_every_member(self, call_id, args)
        if call_id in UNSUPPORTED:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "not served by pools")
        if call_id == ID["C_FindObjectsInit"]:
            return await find_init(self, s, args)
        if call_id in INIT_CALLS:
            return await start_op(self, s, call_id, args)
        if call_id in OP_CALLS:
            if s.op is None:
                raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
            return await continue_op(self, s, call_id, args)
        if call_id in CREATE_TEMPLATES or call_id in OBJECT_WRITE_CALLS:
            # member sessions are all read/write: the module cannot refuse for us
            check_read_only(s.flags, call_id, args, self._is_token_object(call_id, args))
        return await single(self, s, call_id, args)

    def _is_token_object(self, call_id: int, args: list[Any]) -> bool:
        """Whether the object a copy, change or destruction names is a token object."""
        if call_id not in OBJECT_WRITE_CALLS or len(args) < 2:
            return False
        return isinstance(args[1], int) and args[1] not in self.objects.sessions

    async def _close(self, h: int) -> None:
        s = self.sessions.pop(h, None)
        if s is None:
            return
        if s.op is not None:
            # the member session may still be inside the operation: do not reuse it
            await end_op(self, s, broken=True)
        await destroy_session_objects(self, s.objects)

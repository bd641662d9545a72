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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from typing import Any

from ...codec import AttrRequest, Mechanism, Null, ckr
from ...codec import constants as ck
from ...codec.call_table import PLANS
from ...codec.values import HandleParam, KyberParams
from ...errors import BackendUnavailable, Pkcs11Error
from ...state.base import StateStore
from ..attribute_reads import read_whole
from ..base import Backend
from .config import PoolConfig
from .direct import LOOK_UP, start_direct, start_direct_raw
from .finds import find_init, hidden
from .intents import note_doubtful
from .member import (
    BROKE_DOWN,
    BROKE_DOWN_ATTEMPTS,
    BROKE_DOWN_PAUSE,
    ID,
    SESSION_GONE,
    Member,
    MemberDown,
)
from .objects import Key, ObjectIds, SessionObject, as_bytes
from .reconcile import CREATING, TAKE_OVER_INTERVAL, Reconciler
from .replication import DETERMINISTIC, EVERYWHERE, GENERATED, Replicator
from .routes import (
    ANSWERED_HERE,
    DIRECT,
    ENDERS,
    INIT_CALLS,
    MESSAGE_INITS,
    OP_CALLS,
    SLOT_CALLS,
    UNSUPPORTED,
    UPDATES,
)
from .session_objects import call_on_control, destroy_session_objects
from .session_rules import (
    CREATE_TEMPLATES,
    OBJECT_WRITE_CALLS,
    check_read_only,
    keeps_operation,
    new_objects_on_token,
)

log = logging.getLogger("p11gate.pool")

_IDENTITY_REQUEST = (ck.CKA_CLASS, ck.CKA_ID, ck.CKA_LABEL)
#: identity attributes that may be longer than the first read's buffer
_LONG_IDENTITY = frozenset((ck.CKA_ID, ck.CKA_LABEL, ck.CKA_UNIQUE_ID))
#: the longest CKA_ID, CKA_LABEL or CKA_UNIQUE_ID kept as a pool identity
IDENTITY_MAX = 64 * 1024


#: bytes a kept Update part counts against replay_buffer besides its data (its list,
#: tuple and slot in the gateway's memory): empty or tiny parts cannot pile up unbounded
_KEPT_PART_COST = 64


class _Op:
    __slots__ = ("args", "buffered", "call_id", "context_pin", "epoch", "member",
                 "replayable", "session", "updates")

    def __init__(self, call_id: int, args: list[Any], replayable: bool) -> None:
        self.call_id = call_id
        self.args = args
        self.member = -1
        self.session = 0
        self.epoch = 0
        self.updates: list[tuple[int, list[Any]]] = []
        self.buffered = 0
        self.replayable = replayable
        #: a context-specific login (CKA_ALWAYS_AUTHENTICATE) made for this operation:
        #: replayed with it on failover, gone with it
        self.context_pin: bytes | None = None


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
        await self._probe_once()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe())
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

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        next_stats = loop.time() + self.cfg.stats_interval
        next_take_over = loop.time() + TAKE_OVER_INTERVAL
        while True:
            await asyncio.sleep(self.cfg.probe_interval)
            try:
                await self._probe_once()
                if self.reconciler is not None and loop.time() >= next_take_over:
                    next_take_over = loop.time() + TAKE_OVER_INTERVAL
                    await self.reconciler.take_over_orphaned()
            except Exception:
                log.exception("pool probe failed", extra={"pool": self.name})
            if self.cfg.stats_interval and loop.time() >= next_stats:
                next_stats = loop.time() + self.cfg.stats_interval
                self.log_stats()

    def log_stats(self) -> None:
        """One log record with each member's state and load (the `status` figures)."""
        log.info("pool stats", extra={
            "pool": self.name, "failovers": self.failovers, "replays": self.replays,
            "logical_sessions": len(self.sessions),
            "members": {m.name: m.describe() for m in self.members}})

    async def _probe_once(self) -> None:
        for m in self.members:
            if m.state == "up" and not m.usable:
                m.mark_down("backend restarted" if m.backend.up else "backend down")
            if m.state == "down" and m.backend.up:
                try:
                    await asyncio.wait_for(m.attach(self._login), 10.0)
                except (Pkcs11Error, TimeoutError) as e:
                    m.down_reason = str(e) or e.__class__.__name__
                    continue
                log.info("pool member up", extra={"pool": self.name, "member": m.name})
                if self.reconciler is not None:
                    await self.reconciler.reconcile(m)  # before it serves anything
                if self.replicator is not None:
                    try:
                        await self.replicator.catch_up(m)
                    except (Pkcs11Error, MemberDown) as e:
                        log.warning("catch-up failed", extra={"member": m.name,
                                                              "error": str(e)})

    def _forget_pin(self) -> None:
        self._login = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": "pool", "up": self.up, "generation": self.generation,
            "replication": self.cfg.replication, "failovers": self.failovers,
            "replays": self.replays, "objects": len(self.objects),
            **(self.reconciler.describe() if self.reconciler is not None else {}),
            "logical_sessions": len(self.sessions),
            "operations_active": sum(1 for s in self.sessions.values() if s.op is not None),
            "members": [{**m.describe(), "stale_objects": self.objects.stale_count(m.name)}
                        for m in self.members],
            "pinned_objects": [
                {"class": self.objects.by_oid[o][0], "id": _text(self.objects.by_oid[o][1], True),
                 "label": _text(self.objects.by_oid[o][2]),
                 "member": name, "member_state": self._member_named(name)}
                for o, name in self.objects.pinned.items()
                if o in self.objects.by_oid and o not in self.objects.destroyed],
            "made_through_pool": [
                {"label": _text(self.objects.by_oid[o][2]),
                 "class": self.objects.by_oid[o][0], "origin": origin,
                 "pinned": o in self.objects.pinned}
                for o, origin in list(self.objects.origin.items())[-100:]
                if o in self.objects.by_oid and o not in self.objects.destroyed],
        }

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
        return ordered[k:n] + ordered[:k] + ordered[n:]

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

    async def _oid_for(self, m: Member, handle: int) -> int:
        """The pool's id of an object ``m`` just returned (found or created)."""
        oid = m.oids.get(handle)
        if oid is not None:
            return oid
        key = await self._read_key(m, handle)
        if key is not None:
            oid = self.objects.token_oid(key)
            m.handles[oid] = handle
            m.missing.pop(oid, None)
        else:
            oid = self.objects.session_oid(SessionObject(m.index, m.epoch, handle))
        m.oids[handle] = oid
        return oid

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
            return await self._any_member(call_id, args)
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
            return await self._context_login(s, args)
        if call_id in (ID["C_Login"], ID["C_LoginUser"]):
            return await self._login_all(call_id, args)
        if call_id == ID["C_Logout"]:
            return await self._logout_all()
        if call_id in (ID["C_InitPIN"], ID["C_SetPIN"]):
            return await self._on_every_member(call_id, args)
        if call_id in UNSUPPORTED:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "not served by pools")
        if call_id == ID["C_FindObjectsInit"]:
            return await find_init(self, s, args)
        if call_id in INIT_CALLS:
            return await self._start_op(s, call_id, args)
        if call_id in OP_CALLS:
            if s.op is None:
                raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
            return await self._continue_op(s, call_id, args)
        if call_id in CREATE_TEMPLATES or call_id in OBJECT_WRITE_CALLS:
            # member sessions are all read/write: the module cannot refuse for us
            check_read_only(s.flags, call_id, args, self._is_token_object(call_id, args))
        return await self._single(s, call_id, args)

    def _is_token_object(self, call_id: int, args: list[Any]) -> bool:
        """Whether the object a copy, change or destruction names is a token object."""
        if call_id not in OBJECT_WRITE_CALLS or len(args) < 2:
            return False
        return isinstance(args[1], int) and args[1] not in self.objects.sessions

    async def _any_member(self, call_id: int, args: list[Any]) -> list[Any]:
        """A slot or token query on the best usable member. A member whose module broke
        down in it (see BROKE_DOWN) is passed over for the next; when all of them did,
        they are asked again after a short pause, up to BROKE_DOWN_ATTEMPTS rounds, and
        the module's error is the answer after the last. Any other error is the answer
        at once (a query names only the slot and a mechanism: it is the module's)."""
        broke: Pkcs11Error | None = None
        for attempt in range(1, BROKE_DOWN_ATTEMPTS + 1):
            for m in self._candidates(set(), None):
                try:
                    return await m.call(call_id, [m.slot, *args[1:]])
                except MemberDown:
                    continue
                except Pkcs11Error as e:
                    if e.rv not in BROKE_DOWN:
                        raise
                    broke = e
                    log.warning("slot query failed in a member's module; asked elsewhere "
                                "or again", extra={"pool": self.name, "member": m.name,
                                                   "attempt": attempt,
                                                   "call": PLANS[call_id].call.name,
                                                   "error": ckr.name(e.rv)})
            if broke is None:
                break  # no member up: nothing to ask again
            if attempt < BROKE_DOWN_ATTEMPTS:
                await asyncio.sleep(random.uniform(0.0, BROKE_DOWN_PAUSE))
        if broke is not None:
            raise broke
        raise BackendUnavailable(f"pool {self.name}: no member up")

    async def _close(self, h: int) -> None:
        s = self.sessions.pop(h, None)
        if s is None:
            return
        if s.op is not None:
            # the member session may still be inside the operation: do not reuse it
            await self._end_op(s, broken=True)
        await destroy_session_objects(self, s.objects)

    # ------------------------------------------------------------ login

    async def _login_all(self, call_id: int, args: list[Any]) -> list[Any]:
        ok, errors = 0, []
        for m in self.members:
            if not m.usable:
                continue
            try:
                await self._login_member(m, call_id, args)
                ok += 1
            except MemberDown:
                continue
            except Pkcs11Error as e:
                if e.rv == ckr.USER_ALREADY_LOGGED_IN:
                    ok += 1
                else:
                    errors.append((m, e))
        if ok == 0:
            if errors:
                raise errors[0][1]
            raise BackendUnavailable(f"pool {self.name}: no member up")
        for m, err in errors:
            # the others took this PIN: this member is not equivalent
            m.mark_down(f"login refused: {ckr.name(err.rv)}")
        if call_id == ID["C_Login"] and isinstance(args[2], bytes):
            self._login = (args[1], bytes(args[2]))  # for members that join later
        if self.reconciler is not None and self.logged_in:
            await self.reconciler.reconcile_all()  # private objects are in sight now
        return []

    async def _login_member(self, m: Member, call_id: int, args: list[Any]) -> None:
        """The client's C_Login (or C_LoginUser) on member ``m``'s control session; again,
        after a short pause, when its module broke down in it (see BROKE_DOWN: SoftHSM
        fails so before it checks the PIN, so a retry counts no wrong PIN), up to
        BROKE_DOWN_ATTEMPTS times. Any other error, or the last one, is raised: the
        caller then treats the member as refusing the PIN, as before."""
        for attempt in range(1, BROKE_DOWN_ATTEMPTS + 1):
            try:
                await m.call(call_id, [m.control, *args[1:]])
                return
            except Pkcs11Error as e:
                if e.rv not in BROKE_DOWN or attempt == BROKE_DOWN_ATTEMPTS:
                    raise
                log.warning("login failed in a member's module; tried again",
                            extra={"pool": self.name, "member": m.name, "attempt": attempt,
                                   "error": ckr.name(e.rv)})
            await asyncio.sleep(random.uniform(0.0, BROKE_DOWN_PAUSE))

    async def _logout_all(self) -> list[Any]:
        self._forget_pin()
        for m in self.members:
            if m.usable:
                with contextlib.suppress(Pkcs11Error, MemberDown):
                    await m.call(ID["C_Logout"], [m.control])
        return []

    async def _on_every_member(self, call_id: int, args: list[Any]) -> list[Any]:
        done = 0
        for m in self.members:
            if not m.usable:
                continue
            try:
                sess, epoch = await m.lease()
            except MemberDown:
                continue
            try:
                await m.call(call_id, [sess, *args[1:]])
                done += 1
            except MemberDown:
                pass
            finally:
                await m.release(sess, epoch)
        if not done:
            raise BackendUnavailable(f"pool {self.name}: no member up")
        return []

    # ------------------------------------------------------------ single calls

    async def _single(self, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
        if self.reconciler is not None and call_id in CREATING:
            return await self.reconciler.run(
                call_id, args, lambda avoid: self._single_call(call_id, args, avoid, s))
        return await self._single_call(call_id, args, set(), s)

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

    async def _single_call(self, call_id: int, args: list[Any], avoid: set[int],
                           s: _Session | None = None, failures: int = 0) -> list[Any]:
        """One call on the best member, failing over; never on members in ``avoid``.
        ``failures``: members it already failed on (the direct path's)."""
        pinned = self._session_pin(s, call_id, args)
        # a session object is made on the member's control session (see session_objects)
        on_control = call_id in CREATE_TEMPLATES and not all(
            new_objects_on_token(call_id, args, self._is_token_object(call_id, args)))
        tried: set[int] = set(avoid)
        lacking = False
        while True:
            cands = self._candidates(tried, pinned)
            if not cands:
                break
            m = cands[0]
            tried.add(m.index)
            try:
                margs = await self.translate(m, call_id, args)
                if margs is None:
                    lacking = True
                    continue
                if on_control:
                    reply = await call_on_control(m, call_id, margs)
                else:
                    reply = await self._leased_call(m, call_id, margs)
                reply = await self._after(m, call_id, args, reply)
            except MemberDown as e:
                self._failed_over(m, call_id, str(e))
                failures += 1
                if failures >= self.cfg.max_attempts:
                    raise BackendUnavailable(
                        f"pool {self.name}: failed on {failures} members") from None
                continue
            if self.replicator is not None:
                await self._replicate(m, call_id, args, reply)
            if s is not None and call_id in CREATE_TEMPLATES:
                self._own_session_objects(s, m, call_id, reply)
            return reply
        if lacking and pinned is not None and self.members[pinned].usable:
            # the objects it names live on two members: no member can run it
            raise Pkcs11Error(ckr.KEY_HANDLE_INVALID, "objects on two members")
        raise self._unavailable(pinned, lacking, "the object", self._oids_in(call_id, args))

    async def _leased_call(self, m: Member, call_id: int, margs: list[Any]) -> list[Any]:
        sess, epoch = await m.lease()
        broken = False
        try:
            margs[0] = sess
            return await m.call(call_id, margs)
        except MemberDown:
            broken = True
            raise
        except Pkcs11Error as e:
            broken = e.rv in SESSION_GONE  # replaced, the member stays up
            raise
        finally:
            await m.release(sess, epoch, broken)

    def _own_session_objects(self, s: _Session, m: Member, call_id: int,
                             reply: list[Any]) -> None:
        """Session objects a session made die with it, and tie it to their member."""
        for p in PLANS[call_id].new_objects:
            if p < len(reply) and reply[p] in self.objects.sessions:
                s.objects.add(reply[p])
                s.pin = m.index

    async def _replicate(self, m: Member, call_id: int, args: list[Any],
                         reply: list[Any]) -> None:
        assert self.replicator is not None
        if call_id in DETERMINISTIC or call_id in GENERATED:
            new = PLANS[call_id].new_objects
            oids = [reply[p] for p in new if p < len(reply)]
            await self.replicator.created(m, call_id, args, oids)
        elif call_id in EVERYWHERE:
            await self.replicator.everywhere(m, call_id, args)

    def _failed_over(self, m: Member, call_id: int, reason: str) -> None:
        if call_id in CREATING:
            note_doubtful(m)  # its part of the creation may have been made
        m.failovers += 1
        self.failovers += 1
        log.warning("pool failover", extra={"pool": self.name, "member": m.name,
                                            "call_id": call_id, "reason": reason})

    async def _after(self, m: Member, call_id: int, args: list[Any],
                     reply: list[Any]) -> list[Any]:
        """Give new objects pool ids; keep the identity map right after changes."""
        new = PLANS[call_id].new_objects
        if new and not (call_id == ID["C_DeriveKey2"] and len(reply) < 3):
            reply = list(reply)
            for p in new:
                reply[p] = await self._oid_for(m, reply[p])
        elif call_id == ID["C_DestroyObject"]:
            oid = args[1]
            self.objects.sessions.pop(oid, None)
            m.forget_handle(oid)
        elif call_id == ID["C_SetAttributeValue"]:
            oid = args[1]
            h = m.handles.get(oid)
            if h is not None and oid not in self.objects.sessions and any(
                a.type in _IDENTITY_REQUEST for a in args[2]
            ):
                # the object's identity changed: the id follows the object
                key = await self._read_key(m, h)
                if key is not None:
                    self.objects.rekey(oid, key)
                for other in self.members:
                    if other is not m:
                        other.forget_handle(oid)
        return reply

    async def _read_key(self, m: Member, handle: int) -> Key | None:
        """The identity of a token object (None for a session object)."""
        reqs = [AttrRequest(ck.CKA_TOKEN, 1), AttrRequest(ck.CKA_CLASS, 8),
                AttrRequest(ck.CKA_ID, 1024), AttrRequest(ck.CKA_LABEL, 1024)]
        if self.cfg.identity == "unique-id":
            # a module without the attribute answers CKR_ATTRIBUTE_TYPE_INVALID for it
            # and still fills in the others
            reqs.append(AttrRequest(ck.CKA_UNIQUE_ID, 1024))
        attrs, _ = await m.call(ID["C_GetAttributeValue"], [m.control, handle, reqs])
        vals = {a.type: a.value for a in attrs if a.length is not None}
        for a in attrs:
            if a.length is None and a.type in _LONG_IDENTITY and vals.get(ck.CKA_TOKEN):
                # none, or longer than the buffer: read whole, or an identity without it
                # would be another object's (same class and CKA_ID, no label)
                whole = await read_whole(m.call, m.control, handle, a.type, IDENTITY_MAX)
                if whole is not None:
                    vals[a.type] = whole
        if not vals.get(ck.CKA_TOKEN):
            return None
        cls = int(vals.get(ck.CKA_CLASS, 0))
        uid = vals.get(ck.CKA_UNIQUE_ID)
        if uid:
            return (cls, None, None, bytes(uid))
        return (cls, as_bytes(vals.get(ck.CKA_ID)), as_bytes(vals.get(ck.CKA_LABEL)), None)

    # ------------------------------------------------------------ operations

    async def _start_op(self, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
        if s.op is not None or s.find is not None:
            raise Pkcs11Error(ckr.OPERATION_ACTIVE)
        op = _Op(call_id, args, replayable=call_id not in MESSAGE_INITS)
        await self._begin(op, set(), self._session_pin(s, call_id, args))
        s.op = op
        return []

    async def _begin(self, op: _Op, tried: set[int], pinned: int | None) -> None:
        """Lease a session on the best member and run the operation's Init there, then
        replay its Update calls; on a member failure, the next member."""
        lacking = False
        while True:
            cands = self._candidates(tried, pinned)
            if not cands:
                raise self._unavailable(pinned, lacking, "the key",
                                        self._oids_in(op.call_id, op.args))
            m = cands[0]
            tried.add(m.index)
            try:
                margs = await self.translate(m, op.call_id, op.args)
                if margs is None:
                    lacking = True
                    continue
                sess, epoch = await m.lease()
            except MemberDown as e:
                self._failed_over(m, op.call_id, str(e))
                continue
            try:
                margs[0] = sess
                await m.call(op.call_id, margs)
                if op.context_pin is not None:
                    await m.call(ID["C_Login"], [sess, ck.CKU_CONTEXT_SPECIFIC, op.context_pin])
                for cid, uargs in op.updates:
                    uargs2 = await self.translate(m, cid, uargs)
                    if uargs2 is None:
                        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
                    uargs2[0] = sess
                    await m.call(cid, uargs2)
            except MemberDown as e:
                await m.release(sess, epoch, broken=True)
                self._failed_over(m, op.call_id, str(e))
                if len(tried) >= self.cfg.max_attempts:
                    raise BackendUnavailable(
                        f"pool {self.name}: operation failed on {len(tried)} members"
                    ) from None
                continue
            except BaseException:
                await m.release(sess, epoch,
                                broken=bool(op.updates) or op.context_pin is not None)
                raise
            op.member, op.session, op.epoch = m.index, sess, epoch
            return

    async def _continue_op(self, s: _Session, call_id: int, args: list[Any]) -> list[Any]:
        op = s.op
        assert op is not None
        while True:
            m = self.members[op.member]
            try:
                margs = await self.translate(m, call_id, args)
                if margs is None:
                    # C_DigestKey of a key on another member: the operation moves there
                    # (replayed) when it can, else it cannot be served
                    there = self._pinned_member(call_id, args)
                    if there is None or not op.replayable or not self.members[there].usable:
                        # PKCS#11: the error ends it; its Init is still on the session
                        await self._end_op(s, broken=True)
                        raise Pkcs11Error(ckr.KEY_HANDLE_INVALID, "key on another member")
                    await m.release(op.session, op.epoch, broken=True)
                    try:
                        await self._begin(op, set(), there)
                    except BaseException:
                        s.op = None
                        raise
                    continue
                margs[0] = op.session
                if op.epoch != m.epoch:
                    raise MemberDown("member restarted")
                reply = await m.call(call_id, margs)
                break
            except MemberDown as e:
                await m.release(op.session, op.epoch, broken=True)
                self._failed_over(m, call_id, str(e))
                if not op.replayable:
                    s.op = None
                    raise Pkcs11Error(
                        ckr.DEVICE_ERROR, "member failed; operation data beyond replay_buffer"
                    ) from None
                self.replays += 1
                m.replays += 1
                try:
                    await self._begin(op, {op.member}, self._pinned_member(op.call_id, op.args))
                except BaseException:
                    s.op = None
                    raise
            except Pkcs11Error as e:
                if s.op is op and keeps_operation(call_id, e.rv):
                    raise  # the operation goes on (an output-size answer; a bad key handle)
                # PKCS#11: an error ends the operation; a module may still keep it on the
                # member session (SoftHSM after CKR_KEY_INDIGESTIBLE), so that session
                # is closed and replaced rather than leased to another client mid-way
                if s.op is op:
                    await self._end_op(s, broken=True)
                raise
        if call_id in UPDATES:
            self._remember_update(op, call_id, args)
        elif call_id in ENDERS and not (reply and isinstance(reply[0], Null)):
            await self._end_op(s)
        return reply

    async def _context_login(self, s: _Session, args: list[Any]) -> list[Any]:
        """CKU_CONTEXT_SPECIFIC: on the member session that holds the operation."""
        op = s.op
        if op is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        pin = bytes(args[2]) if isinstance(args[2], bytes) else b""
        m = self.members[op.member]
        try:
            if op.epoch != m.epoch:
                raise MemberDown("member restarted")
            await m.call(ID["C_Login"], [op.session, ck.CKU_CONTEXT_SPECIFIC, pin])
        except MemberDown as e:
            await m.release(op.session, op.epoch, broken=True)
            self._failed_over(m, ID["C_Login"], str(e))
            op.context_pin = pin  # replayed after the Init on the next member
            try:
                await self._begin(op, {op.member}, self._pinned_member(op.call_id, op.args))
            except BaseException:
                s.op = None
                raise
            return []
        op.context_pin = pin  # for a replay; gone with the operation
        return []

    def _remember_update(self, op: _Op, call_id: int, args: list[Any]) -> None:
        if not op.replayable:
            return
        # what keeping the part costs, not only its data: empty parts are not free
        size = (len(args[1]) if isinstance(args[1], bytes) else 8) + _KEPT_PART_COST
        op.buffered += size
        if op.buffered > self.cfg.replay_buffer:
            op.replayable = False
            op.updates.clear()  # no longer useful: free it
            return
        op.updates.append((call_id, list(args)))

    async def _end_op(self, s: _Session, broken: bool = False) -> None:
        op, s.op = s.op, None
        if op is not None and op.member >= 0:
            await self.members[op.member].release(op.session, op.epoch, broken)


def _text(b: bytes | None, hexa: bool = False) -> str | None:
    if b is None:
        return None
    return b.hex() if hexa else b.decode("utf-8", "replace")

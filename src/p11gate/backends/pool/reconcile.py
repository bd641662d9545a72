"""Creations through a gateway-replicated pool: intent first, reconcile after a crash.

:class:`Reconciler` wraps every creation of token objects (C_CreateObject, C_CopyObject,
C_UnwrapKey, C_DeriveKey, C_GenerateKey, C_GenerateKeyPair):

1. it works out the identities the call will create (CKA_CLASS, CKA_ID, CKA_LABEL from
   the templates, with the PKCS#11 defaults: an empty CKA_ID and CKA_LABEL) and refuses
   with CKR_ATTRIBUTE_VALUE_INVALID an identity that is already on a member, or being
   created, or known to the registry and possibly on a member that is down -- two
   objects with one identity are one object to a pool, and a crash could not tell them
   apart;
2. it records the intent (:mod:`.intents`) before any member is asked;
3. it marks the intent done once the reply is ready, or, when the call fails, destroys
   whatever of it the members hold and keeps the intent for members it could not reach.

:meth:`Reconciler.reconcile` runs for a member when it attaches (at start and when it
rejoins) and for every member when the pool is logged in: it destroys on that member
every object of an unsettled intent's identities (no client was told about them: the
policy is *destroy*, never adopt) and logs each destruction. A member is settled for an
intent only by a pass made while the pool is logged in (private objects are invisible
before); until then, creations of those identities do not use that member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ...codec import Attribute, ckr
from ...codec import constants as ck
from ...errors import Pkcs11Error
from .intents import CURRENT, FRAGMENT, MIDWAY_ERRORS, IdentityBusy, Intent, IntentLog
from .member import ID, Member, MemberDown
from .objects import Key, ObjectIds
from .replication import DETERMINISTIC, GENERATED

if TYPE_CHECKING:
    from .pool import PoolBackend

log = logging.getLogger("p11gate.pool")

CREATING = DETERMINISTIC | GENERATED
_FIND_BATCH = 64
#: half-made objects destroyed per class and pass at most (a module leaves few)
_FRAGMENT_MAX = 256
#: what a module answers when a creation broke down inside it rather than because of
#: the request. SoftHSM's file store, written by two processes at once (two gateway nodes
#: whose workers share a token), fails a C_GenerateKeyPair now and then with
#: CKR_GENERAL_ERROR, or CKR_TEMPLATE_INCONSISTENT when it re-read its new object half
#: written, and makes it on a second try. The failed attempt is undone (its objects
#: destroyed, its fragments recorded) before the next, so a retry never leaves a copy;
#: a request that is really wrong gets the same error after the last attempt.
RETRIED = frozenset((ckr.GENERAL_ERROR, ckr.FUNCTION_FAILED, ckr.TEMPLATE_INCONSISTENT))
CREATION_ATTEMPTS = 3
#: seconds, at most, between two attempts (random: two racing writers fall out of step)
_RETRY_PAUSE = 0.05
#: what a cleaning pass on a member may meet from the same racing writers: a breakdown
#: (above), or a handle its find gave a moment before that the module no longer knows
#: (the other process rewrote the store, or destroyed the object). The pass is made
#: again -- finds first, so only what is still there is destroyed -- up to
#: CREATION_ATTEMPTS times; a member left unclean is avoided by the creation's retry,
#: which then leaves it without a copy of the new object
CLEAN_RETRIED = RETRIED | {ckr.OBJECT_HANDLE_INVALID}


class NotRecorded(Pkcs11Error):
    """The registry could not be written for a creation: it was refused or undone."""

    def __init__(self) -> None:
        super().__init__(ckr.GENERAL_ERROR, "the registry cannot be written")


def _attr(template: Any, atype: int) -> Any:
    if not isinstance(template, list):
        return None
    for a in template:
        if isinstance(a, Attribute) and a.type == atype and a.length is not None:
            return a.value
    return None


def _truthy(v: Any) -> bool:
    return bool(v) and v != b"\0"


def _bytes_or_default(v: Any, default: bytes | None) -> bytes | None:
    if v is None:
        return default
    if not isinstance(v, bytes):
        raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "CKA_ID and CKA_LABEL are byte strings")
    return bytes(v)


def _key_of(template: Any, default_class: int | None, token_default: bool = False,
            base: Key | None = None) -> Key | None:
    """The identity an object made from ``template`` gets; None for a session object."""
    token = _attr(template, ck.CKA_TOKEN)
    if not (_truthy(token) if token is not None else token_default):
        return None
    cls = _attr(template, ck.CKA_CLASS)
    if cls is None:
        cls = base[0] if base is not None else default_class
    if not isinstance(cls, int):
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_CLASS is needed")
    # data objects have no CKA_ID; everything else defaults to an empty one
    id_default = None if cls == ck.CKO_DATA else b""
    label_default: bytes | None = b""
    if base is not None:
        id_default, label_default = base[1], base[2]
    return (cls, _bytes_or_default(_attr(template, ck.CKA_ID), id_default),
            _bytes_or_default(_attr(template, ck.CKA_LABEL), label_default), None)


def creation_keys(call_id: int, args: list[Any], objects: ObjectIds) -> list[Key]:
    """The token-object identities call ``call_id`` will create (none: no intent)."""
    keys: list[Key | None]
    if call_id == ID["C_GenerateKeyPair"]:
        keys = [_key_of(args[2], ck.CKO_PUBLIC_KEY), _key_of(args[3], ck.CKO_PRIVATE_KEY)]
    elif call_id in (ID["C_GenerateKey"], ID["C_DeriveKey"]):
        keys = [_key_of(args[-1], ck.CKO_SECRET_KEY)]
    elif call_id == ID["C_UnwrapKey"]:
        keys = [_key_of(args[-1], ck.CKO_SECRET_KEY)]
    elif call_id == ID["C_CreateObject"]:
        keys = [_key_of(args[1], None)]
    elif call_id == ID["C_CopyObject"]:
        source = objects.by_oid.get(args[1])
        if args[1] in objects.sessions or source is None:
            # a copy of a session object is a session object unless it asks otherwise;
            # its class, id and label come from the source: unknown here, so a token
            # copy of a session object has an identity only if the template names one
            keys = [_key_of(args[2], None) if _attr(args[2], ck.CKA_CLASS) is not None
                    else None]
        else:
            keys = [_key_of(args[2], None, token_default=True, base=source)]
    else:
        return []
    return [k for k in keys if k is not None]


#: how often a running pool looks for the intents of gateways whose lease ran out
#: (leases last 30 s after a gateway's last heartbeat)
TAKE_OVER_INTERVAL = 5.0


class Reconciler:
    def __init__(self, pool: PoolBackend) -> None:
        self.pool = pool
        self.intents = IntentLog(pool.name, pool.objects.registry)
        self._lock = asyncio.Lock()
        #: objects destroyed because no client was told about them
        self.destroyed = 0
        #: intents settled on every member
        self.settled = 0
        #: intents of a dead process or node taken over while running
        self.taken_over = 0
        for it in self.intents.open.values():
            if it.state not in ("done", FRAGMENT):
                self._tombstone(it)
        if self.intents.found_at_start:
            log.warning("pool has unsettled creation intents from an earlier run; members "
                        "are reconciled as they attach and once the pool is logged in",
                        extra={"pool": pool.name, "intents": self.intents.found_at_start,
                               "identities": sum(len(it.keys)
                                                 for it in self.intents.open.values())})

    @property
    def objects(self) -> ObjectIds:
        return self.pool.objects

    def describe(self) -> dict[str, int]:
        return {"intents_found_at_start": self.intents.found_at_start,
                "fragment_checks_at_start": self.intents.fragment_checks_at_start,
                "intents_unsettled": self.intents.unsettled_count(),
                "intents_settled": self.settled, "reconcile_destroyed": self.destroyed,
                "intents_taken_over": self.taken_over}

    # ------------------------------------------------------------ a creation

    async def run(self, call_id: int, args: list[Any],
                  call: Callable[[set[int]], Awaitable[list[Any]]]) -> list[Any]:
        """Run creation ``call`` (given the members it must not use) under an intent;
        again, under a new one, when a module broke down in it (see RETRIED)."""
        keys = creation_keys(call_id, args, self.objects)
        if not keys:
            return await call(set())
        for attempt in range(1, CREATION_ATTEMPTS + 1):
            try:
                return await self._run_once(keys, call)
            except NotRecorded:
                raise  # the registry, not a module: a retry would only hide it
            except Pkcs11Error as e:
                if e.rv not in RETRIED or attempt == CREATION_ATTEMPTS:
                    raise
                log.warning("pool creation failed in a member's module; undone and "
                            "tried again", extra={"pool": self.pool.name, "attempt": attempt,
                                                  "error": ckr.name(e.rv)})
            # out of step with whatever else writes the token (another node's worker)
            await asyncio.sleep(random.uniform(0.0, _RETRY_PAUSE))
        raise AssertionError("unreachable")

    async def _run_once(self, keys: list[Key],
                        call: Callable[[set[int]], Awaitable[list[Any]]]) -> list[Any]:
        """One attempt: intent, call, then done -- or undone, the error raised."""
        if self.intents.in_flight(keys):
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID,
                              "an object of this class, CKA_ID and CKA_LABEL is being created")
        # claimed in memory, then checked, then written: a row is never written for an
        # identity that exists (a crash would have its objects destroyed)
        it = self.intents.reserve(keys, [m.name for m in self.pool.members])
        try:
            await self._refuse_duplicates(it)
        except BaseException:
            self.intents.discard(it)
            raise
        try:
            self.intents.begin(it)
        except IdentityBusy:
            raise
        except Exception as e:
            log.error("pool creation refused: its intent cannot be recorded",
                      extra={"pool": self.pool.name, "error": str(e)})
            raise NotRecorded() from None
        token = CURRENT.set(it)
        # a member down for the whole call was never asked: a failure need not wait for it
        asked = {m.name for m in self.pool.members if m.usable}
        try:
            try:
                reply = await call({m.index for m in self.pool.members if m.name in it.avoid})
                self.intents.done(it)
            except BaseException as e:
                asked |= {m.name for m in self.pool.members if m.usable}
                if isinstance(e, Pkcs11Error) and e.rv in MIDWAY_ERRORS:
                    self.suspect_fragments(asked, it.keys)
                await self._undo(it, e, asked | it.doubtful)
                if isinstance(e, Exception) and not isinstance(e, Pkcs11Error):
                    log.error("pool creation undone: it could not be recorded",
                              extra={"pool": self.pool.name, "error": str(e)})
                    raise NotRecorded() from None
                raise
        finally:
            CURRENT.reset(token)
        for m in self.pool.members:  # members that failed mid-way and are back already
            if m.name in it.unsettled and m.usable:
                await self.reconcile(m)
        return reply

    def suspect_fragments(self, members: set[str], keys: list[Key]) -> None:
        for name in sorted(members):
            try:
                self.intents.suspect_fragments(name, {k[0] for k in keys})
            except Exception as e:  # only the clean-up of a module's leftovers is lost
                log.error("registry not updated", extra={"pool": self.pool.name,
                                                         "error": str(e)})

    async def _refuse_duplicates(self, it: Intent) -> None:
        for key in it.keys:
            oid = self.objects.by_key.get(key)
            live = oid is not None and oid not in self.objects.destroyed
            for m in self.pool.members:
                if m.name in it.avoid or (oid is not None and self.objects.is_stale(oid, m.name)):
                    continue  # cleaned before it is used for this identity / holds no copy
                found: list[int] = []
                if m.usable:
                    with contextlib.suppress(MemberDown):
                        found = await self._find_all(m, key, 1)
                elif live:
                    found = [0]  # may be there: the registry knows it
                if found:
                    raise Pkcs11Error(
                        ckr.ATTRIBUTE_VALUE_INVALID,
                        "an object of this class, CKA_ID and CKA_LABEL exists on the pool")

    async def _undo(self, it: Intent, why: BaseException, asked: set[str]) -> None:
        """The creation failed: nothing of it may stay where no client knows it."""
        log.warning("pool creation failed; undoing it on the members",
                    extra={"pool": self.pool.name, "intent": it.id,
                           "error": str(why) or why.__class__.__name__})
        try:
            self.intents.failed(it, asked)
        except Exception as e:  # still 'pending' in the registry: cleaned at next start
            it.live, it.state, it.unsettled = False, "failed", set(asked)
            log.error("intent not updated", extra={"pool": self.pool.name, "error": str(e)})
        self._tombstone(it)
        for m in self.pool.members:
            if m.usable:
                with contextlib.suppress(Exception):
                    await self.reconcile(m)

    def _tombstone(self, it: Intent) -> None:
        """The identities of a creation no client was told about are not live objects."""
        for key in it.keys:
            oid = self.objects.by_key.get(key)
            if oid is not None and oid not in self.objects.destroyed:
                try:
                    self.objects.set_state(oid, origin=self.objects.origin.get(oid),
                                           pinned=None, destroyed=True)
                except Exception as e:
                    log.error("registry not updated", extra={"pool": self.pool.name,
                                                             "error": str(e)})

    # ------------------------------------------------------------ reconcile

    async def take_over_orphaned(self) -> int:
        """Take over, and reconcile on the usable members, the intents of a process or
        node whose lease ran out while this one runs (see IntentLog.take_over_orphaned):
        as its restart, or any gateway's next start, would. Returns how many."""
        try:
            found = self.intents.take_over_orphaned()
        except Exception as e:  # the store is unreachable now: the next round tries again
            log.warning("pool intents of dead gateways not read",
                        extra={"pool": self.pool.name, "error": str(e)})
            return 0
        if not found:
            return 0
        try:  # the dead node made these: this node's cache may not know them yet
            for it in found:
                for key in it.keys:
                    self.objects.reload(key)
        except Exception as e:  # not taken over half-informed: the next round again
            for it in found:
                self.intents.open.pop(it.id, None)
            log.warning("pool intents of dead gateways not taken over: object ids not read",
                        extra={"pool": self.pool.name, "error": str(e)})
            return 0
        for it in found:
            if it.state != "done":
                self._tombstone(it)
        self.taken_over += len(found)
        log.warning("pool took over the creation intents of a gateway whose lease ran out; "
                    "reconciling them", extra={
                        "pool": self.pool.name, "intents": len(found),
                        "identities": sum(len(it.keys) for it in found)})
        await self.reconcile_all()
        return len(found)

    async def reconcile_all(self) -> None:
        for m in self.pool.members:
            if m.usable:
                await self.reconcile(m)

    async def reconcile(self, m: Member) -> None:
        """Destroy on ``m`` every object of an unsettled intent's identities."""
        async with self._lock:
            logged_in = self.pool.logged_in
            for it in list(self.intents.open.values()):
                if it.live or m.name not in it.unsettled or not m.usable:
                    continue
                try:
                    await self._clean(m, it)
                except (MemberDown, Pkcs11Error) as e:
                    log.warning("pool reconcile incomplete on member",
                                extra={"pool": self.pool.name, "member": m.name,
                                       "intent": it.id, "error": str(e)})
                    continue
                if not logged_in:
                    continue  # private objects were out of sight: again after login
                try:
                    self.intents.settle(it, m.name)
                except Exception as e:
                    log.error("intent not updated", extra={"pool": self.pool.name,
                                                           "error": str(e)})
                    continue
                if it.id not in self.intents.open and it.state != FRAGMENT:
                    self.settled += 1
                    log.info("pool reconcile: intent settled on every member",
                             extra={"pool": self.pool.name, "intent": it.id,
                                    "intent_state": it.state, "objects": len(it.keys)})

    async def _clean(self, m: Member, it: Intent) -> None:
        """One cleaning pass for intent ``it`` on ``m``; again when it met a racing
        writer (see CLEAN_RETRIED)."""
        for attempt in range(1, CREATION_ATTEMPTS + 1):
            try:
                for key in it.keys:
                    await self._destroy_all(m, it, key)
                return
            except Pkcs11Error as e:
                if e.rv not in CLEAN_RETRIED or attempt == CREATION_ATTEMPTS:
                    raise
                log.warning("pool reconcile pass failed in a member's module; made again",
                            extra={"pool": self.pool.name, "member": m.name,
                                   "intent": it.id, "attempt": attempt,
                                   "error": ckr.name(e.rv)})
            await asyncio.sleep(random.uniform(0.0, _RETRY_PAUSE))

    async def _destroy_all(self, m: Member, it: Intent, key: Key) -> None:
        oid = self.objects.by_key.get(key)
        if it.state == FRAGMENT:
            await self._destroy_fragments(m, it, key)
            return
        await self._destroy_matching(m, it, key, "destroyed")
        if oid is not None:
            m.forget_handle(oid)
            m.missing.pop(oid, None)
        # A module may leave a half-made object when a creation fails or its process
        # dies in it: SoftHSM keeps the object with default attributes (no CKA_ID, no
        # CKA_LABEL) when C_CreateObject/C_UnwrapKey fail after making it. Such a
        # fragment of this class goes too -- unless the registry knows an object with
        # that empty identity, which could then not be told from it.
        fragment: Key = (key[0], None if key[1] is None else b"", b"", None)
        if fragment != key:
            await self._destroy_fragments(m, it, fragment)

    async def _destroy_fragments(self, m: Member, it: Intent, fragment: Key) -> None:
        """Destroy ``m``'s half-made objects of this class. They are found whatever their
        CKA_TOKEN: the module may not have written it (SoftHSM leaves it false on them,
        though they are in the token's store). Never an object the registry knows by
        that empty identity (it could not be told from them), nor a session object a
        client holds through the pool."""
        known = self.objects.by_key.get(fragment)
        if known is not None and known not in self.objects.destroyed:
            return
        held = {so.handle for so in self.objects.sessions.values()
                if so.member == m.index and so.epoch == m.epoch}
        template = [a for a in ObjectIds.template(fragment) if a.type != ck.CKA_TOKEN]
        for h in await self._find_template(m, template, _FRAGMENT_MAX):
            if h not in held:
                await self._destroy_one(m, it, fragment, h, "destroyed a fragment")

    async def _destroy_matching(self, m: Member, it: Intent, key: Key, action: str) -> None:
        while True:
            found = await self._find_all(m, key, _FIND_BATCH)
            for h in found:
                await self._destroy_one(m, it, key, h, action)
            if len(found) < _FIND_BATCH:
                break

    async def _destroy_one(self, m: Member, it: Intent, key: Key, h: int,
                           action: str) -> None:
        await m.call(ID["C_DestroyObject"], [m.control, h])
        self.destroyed += 1
        log.warning("pool reconcile: destroyed an object no client was told about",
                    extra={"pool": self.pool.name, "member": m.name, "intent": it.id,
                           "intent_state": it.state, "class": key[0],
                           "id": None if key[1] is None else key[1].hex(),
                           "label": None if key[2] is None
                           else key[2].decode("utf-8", "replace"),
                           "action": action})

    async def _find_all(self, m: Member, key: Key, limit: int) -> list[int]:
        """Handles of ``m``'s token objects of identity ``key`` (at most ``limit``)."""
        return await self._find_template(m, ObjectIds.template(key), limit)

    async def _find_template(self, m: Member, template: list[Attribute],
                             limit: int) -> list[int]:
        out: list[int] = []
        async with m.control_lock:
            await m.call(ID["C_FindObjectsInit"], [m.control, template])
            try:
                while len(out) < limit:
                    (batch,) = await m.call(ID["C_FindObjects"], [m.control, limit])
                    if not isinstance(batch, list) or not batch:
                        break
                    out += [int(h) for h in batch]
            finally:
                with contextlib.suppress(Pkcs11Error, MemberDown):
                    await m.call(ID["C_FindObjectsFinal"], [m.control])
        return out[:limit]

"""Gateway replication: the pool keeps its members identical itself.

* Deterministic creations (C_CreateObject, C_CopyObject, C_UnwrapKey, C_DeriveKey) and
  changes (C_SetAttributeValue, C_DestroyObject) of token objects run on every usable
  member.
* Generated keys (C_GenerateKey, C_GenerateKeyPair) are random: they are made on one
  member, then copied to the others — public keys by their public attributes, private
  and secret keys by C_WrapKey/C_UnwrapKey under the pool's wrapping key. A key that may
  not be wrapped (CKA_EXTRACTABLE false) stays *pinned* to the member that made it: the
  registry records it, status and logs report it, and when that member is down its use
  fails with CKR_DEVICE_ERROR instead of ever reaching another member's object.
* Destructions are remembered (tombstones): a member that missed one while it was down
  has the object destroyed when it returns. A member that missed a creation or a change
  (it was down, or the call failed there) is marked *stale* for that object in the
  registry and never chosen for it: it holds no copy, or one with old attributes (a key
  whose CKA_SIGN was turned off, say), and serving that would be wrong. Status reports
  each member's stale objects.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ...codec import Attribute, AttrRequest, Mechanism, ckr
from ...codec import constants as ck
from ...codec.call_table import ids_where
from ...errors import Pkcs11Error
from .intents import MIDWAY_ERRORS, avoided, note_doubtful
from .member import ID, Member, MemberDown
from .objects import ObjectIds

if TYPE_CHECKING:
    from .pool import PoolBackend

log = logging.getLogger("p11gate.pool")

CKA_KEY_TYPE, CKA_VALUE_LEN = ck.CKA_KEY_TYPE, ck.CKA_VALUE_LEN
CKA_SENSITIVE, CKA_EXTRACTABLE = ck.CKA_SENSITIVE, ck.CKA_EXTRACTABLE
CKM_AES_KEY_WRAP_PAD = ck.CKM_AES_KEY_WRAP_PAD
#: attributes a copy keeps, by object class (read from the original; those it lacks skip)
BOOL_ATTRS = (ck.CKA_TOKEN, ck.CKA_PRIVATE, ck.CKA_ENCRYPT, ck.CKA_DECRYPT, ck.CKA_WRAP,
              ck.CKA_UNWRAP, ck.CKA_SIGN, ck.CKA_VERIFY, ck.CKA_DERIVE, CKA_SENSITIVE,
              CKA_EXTRACTABLE)
PUBLIC_VALUE_ATTRS = (ck.CKA_EC_PARAMS, ck.CKA_EC_POINT, ck.CKA_MODULUS,
                      ck.CKA_PUBLIC_EXPONENT)
WRAP_MAX = 16384

DETERMINISTIC = ids_where(lambda p: p.replication == "deterministic")
GENERATED = ids_where(lambda p: p.replication == "generated")
EVERYWHERE = ids_where(lambda p: p.replication == "everywhere")


class Replicator:
    def __init__(self, pool: PoolBackend) -> None:
        self.pool = pool
        self.wrapping_label = (pool.cfg.wrapping_key or "").encode()

    @property
    def objects(self) -> ObjectIds:
        return self.pool.objects

    # ------------------------------------------------------------ creation

    async def created(self, origin: Member, call_id: int, args: list[Any],
                      new_oids: list[int]) -> None:
        """After ``origin`` made objects ``new_oids``: make them on the other members."""
        token_oids = [o for o in new_oids if o not in self.objects.sessions]
        for oid in token_oids:
            self.objects.set_state(oid, origin=origin.name)
            self.objects.clear_stale(oid, origin.name)
        if not token_oids:
            return
        for m in self.pool.members:
            if m is origin:
                continue
            if not m.usable:
                # it may even hold an older object of the same identity (destroyed and
                # made again while it was away): it must not serve this one
                self._missed(m, token_oids, "member is down")
                continue
            if avoided(m):  # it may hold a copy no client knows: cleaned, never used
                self._missed(m, token_oids, "member is to be reconciled first")
                continue
            try:
                if call_id in DETERMINISTIC:
                    await self._run_on(m, call_id, args)
                else:
                    for oid in token_oids:
                        await self._copy(origin, m, oid)
            except (MemberDown, Pkcs11Error) as e:
                # the copy may have been made before the member failed, or half made: a
                # module can keep an object with default attributes when a creation
                # fails in it (SoftHSM does on CKR_GENERAL_ERROR). Either way the
                # member is cleaned of these identities (and such fragments) before the
                # call returns, and never serves them.
                note_doubtful(m)
                if (isinstance(e, Pkcs11Error) and e.rv in MIDWAY_ERRORS
                        and self.pool.reconciler is not None):
                    self.pool.reconciler.suspect_fragments(
                        {m.name}, [self.objects.by_oid[o] for o in token_oids
                                   if o in self.objects.by_oid])
                self._missed(m, token_oids, str(e))
            else:
                for oid in token_oids:
                    m.forget_handle(oid)
                    self.objects.clear_stale(oid, m.name)

    def _missed(self, m: Member, oids: list[int], why: str) -> None:
        for oid in oids:
            if oid not in self.objects.pinned:  # a pinned key is used on its member only
                self.objects.mark_stale(oid, m.name)
        log.warning("member missed a creation or change; it will not serve the object",
                    extra={"pool": self.pool.name, "member": m.name, "reason": why})

    async def _run_on(self, m: Member, call_id: int, args: list[Any]) -> None:
        margs = await self.pool.translate(m, call_id, args)
        if margs is None:
            raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID, "input object missing")
        sess, epoch = await m.lease()
        broken = False
        try:
            margs[0] = sess
            await m.call(call_id, margs)
        except MemberDown:
            broken = True
            raise
        finally:
            await m.release(sess, epoch, broken)

    async def _read(self, m: Member, handle: int, types: tuple[int, ...],
                    size: int) -> dict[int, Any]:
        reqs = [AttrRequest(t, size) for t in types]
        attrs, _ = await m.call(ID["C_GetAttributeValue"], [m.control, handle, reqs])
        return {a.type: a.value for a in attrs if a.length is not None}

    async def _copy(self, src: Member, dst: Member, oid: int) -> None:
        key = self.objects.by_oid[oid]
        h = src.handles.get(oid)
        if h is None:
            h = await src.find_by_identity(oid, ObjectIds.template(key))
            if h is None:
                raise Pkcs11Error(ckr.OBJECT_HANDLE_INVALID, "original vanished")
        cls = key[0]
        flags = await self._read(src, h, BOOL_ATTRS, 1)
        ulongs = await self._read(src, h, (CKA_KEY_TYPE, CKA_VALUE_LEN), 8)
        template = ObjectIds.template(key)[1:]  # CKA_CLASS, and CKA_ID/LABEL if it has them
        template += [Attribute(t, int(bool(v)), 1) for t, v in flags.items()]
        if CKA_KEY_TYPE in ulongs:
            template.append(Attribute(CKA_KEY_TYPE, ulongs[CKA_KEY_TYPE], 8))
        if cls in (ck.CKO_PRIVATE_KEY, ck.CKO_SECRET_KEY):
            if not flags.get(CKA_EXTRACTABLE):
                self._pin(oid, src, "CKA_EXTRACTABLE is false")
                return
            await self._wrap_copy(src, h, dst, template, oid)
        else:
            values = await self._read(src, h, PUBLIC_VALUE_ATTRS, 4096)
            template += [Attribute(t, v, len(v)) for t, v in values.items()
                         if isinstance(v, bytes)]
            await self._run_create(dst, template)

    def _pin(self, oid: int, m: Member, why: str) -> None:
        if self.objects.pinned.get(oid) != m.name:
            key = self.objects.by_oid.get(oid)
            self.objects.set_state(oid, pinned=m.name)
            log.warning("key pinned to one member: it cannot be copied",
                        extra={"pool": self.pool.name, "member": m.name, "reason": why,
                               "label": key[2].decode("utf-8", "replace")
                               if key and key[2] is not None else None})

    async def _wrapping_key(self, m: Member) -> int:
        if not self.wrapping_label:
            raise Pkcs11Error(ckr.KEY_HANDLE_INVALID, "no wrapping_key configured")
        tmpl = [Attribute(ck.CKA_CLASS, ck.CKO_SECRET_KEY, 8),
                Attribute(ck.CKA_LABEL, self.wrapping_label, len(self.wrapping_label))]
        async with m.control_lock:
            try:
                await m.call(ID["C_FindObjectsInit"], [m.control, tmpl])
                (found,) = await m.call(ID["C_FindObjects"], [m.control, 2])
            finally:
                with contextlib.suppress(Pkcs11Error, MemberDown):
                    await m.call(ID["C_FindObjectsFinal"], [m.control])
        if not isinstance(found, list) or not found:
            raise Pkcs11Error(ckr.KEY_HANDLE_INVALID,
                              f"wrapping key {self.wrapping_label!r} not on {m.name}")
        return int(found[0])

    async def _wrap_copy(self, src: Member, h: int, dst: Member, template: list[Attribute],
                         oid: int) -> None:
        mech = Mechanism(CKM_AES_KEY_WRAP_PAD, None)
        wk_src, wk_dst = await self._wrapping_key(src), await self._wrapping_key(dst)
        sess, epoch = await src.lease()
        try:
            (blob,) = await src.call(ID["C_WrapKey"], [sess, mech, wk_src, h, WRAP_MAX])
        except Pkcs11Error as e:
            if e.rv in (ckr.KEY_UNEXTRACTABLE, ckr.KEY_NOT_WRAPPABLE):
                self._pin(oid, src, ckr.name(e.rv))
                return
            raise
        finally:
            await src.release(sess, epoch)
        # CKA_EXTRACTABLE/SENSITIVE come with the unwrapped key; keep what the original had
        sess, epoch = await dst.lease()
        try:
            await dst.call(ID["C_UnwrapKey"], [sess, mech, wk_dst, bytes(blob), template])
        finally:
            await dst.release(sess, epoch)

    async def _run_create(self, m: Member, template: list[Attribute]) -> None:
        sess, epoch = await m.lease()
        try:
            await m.call(ID["C_CreateObject"], [sess, template])
        finally:
            await m.release(sess, epoch)

    # ------------------------------------------------------------ changes

    async def everywhere(self, first: Member, call_id: int, args: list[Any]) -> None:
        """After ``first`` changed or destroyed a token object: the same on the others."""
        oid = args[1]
        if oid in self.objects.sessions:
            return
        destroy = call_id == ID["C_DestroyObject"]
        for m in self.pool.members:
            if m is first:
                continue
            if destroy and self.objects.is_stale(oid, m.name) and m.usable:
                await self._destroy_stale(m, oid)
                continue
            if not m.usable:
                if not destroy:  # a missed destruction is caught up by its tombstone
                    self._missed(m, [oid], "member is down")
                continue
            try:
                await self._run_on(m, call_id, args)
            except (MemberDown, Pkcs11Error) as e:
                if not destroy:
                    self._missed(m, [oid], str(e))
                else:
                    log.info("destruction not applied on member; it will be on its return",
                             extra={"pool": self.pool.name, "member": m.name,
                                    "error": str(e)})
            if destroy:
                m.forget_handle(oid)
        if call_id == ID["C_DestroyObject"]:
            # remembered, so that members that missed it destroy it when they return
            self.objects.set_state(oid, origin=self.objects.origin.get(oid),
                                   pinned=None, destroyed=True)

    async def _destroy_copy(self, m: Member, oid: int) -> bool:
        """Destroy ``m``'s copy of object ``oid``, found by its identity; False if ``m``
        has none."""
        key = self.objects.by_oid.get(oid)
        h = None if key is None else await m.find_by_identity(oid, ObjectIds.template(key))
        try:
            if h is not None:
                await m.call(ID["C_DestroyObject"], [m.control, h])
        finally:
            m.forget_handle(oid)
        return h is not None

    async def _destroy_stale(self, m: Member, oid: int) -> None:
        """Destroy ``m``'s out-of-date copy of an object destroyed through the pool."""
        with contextlib.suppress(MemberDown, Pkcs11Error):
            await self._destroy_copy(m, oid)

    async def catch_up(self, m: Member) -> None:
        """A member (re)joined: destroy on it what was destroyed while it was away."""
        for oid in list(self.objects.destroyed):
            try:
                if await self._destroy_copy(m, oid):
                    log.info("member caught up: destroyed an object it missed",
                             extra={"pool": self.pool.name, "member": m.name})
            except Pkcs11Error as e:
                log.warning("catch-up failed", extra={"member": m.name, "error": str(e)})
        stale = self.objects.stale_count(m.name)
        if stale:
            log.warning("member is kept out of rotation for objects it missed changes to",
                        extra={"pool": self.pool.name, "member": m.name, "objects": stale})

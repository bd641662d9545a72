"""Finds on a pool: every usable member searches, each object is listed once, and
what clients must not see (the pool's own wrapping key, out-of-date copies) is left out.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec import constants as ck
from ...errors import BackendUnavailable, Pkcs11Error
from .identities import oid_for
from .member import Member
from .member_rules import ID, MemberDown, deadline_strike
from .objects import Key

if TYPE_CHECKING:
    from .pool import PoolBackend


async def find_init(pool: PoolBackend, s: Any, args: list[Any]) -> list[Any]:
    """C_FindObjectsInit: the search runs on every usable member now; C_FindObjects
    hands out its result."""
    if s.find is not None or s.op is not None:
        raise Pkcs11Error(ckr.OPERATION_ACTIVE)
    found: list[int] = []
    seen: set[int] = set()
    served = 0
    deadline_missed = False
    for m in pool._candidates(set(), None):
        try:
            oids = await find_on(pool, m, args)
        except MemberDown as e:
            pool._failed_over(m, ID["C_FindObjectsInit"], str(e))
            deadline_missed = deadline_strike(e, deadline_missed)
            continue
        served += 1
        for oid in oids:
            if oid not in seen:  # the same object on several members: once
                seen.add(oid)
                found.append(oid)
    if not served:
        raise BackendUnavailable(f"pool {pool.name}: no member could search")
    # keys pinned to a member that is down still exist: list those the template
    # surely matches, so that using them says why it fails instead of "no such key"
    for oid, name in pool.objects.pinned.items():
        if oid not in seen and oid not in pool.objects.destroyed \
                and pool._member_named(name) != "up" \
                and matches(args[1], pool.objects.by_oid.get(oid)):
            found.append(oid)
            seen.add(oid)
    # so do objects whose up-to-date copies are all on members that are down
    for oid in pool.objects.stale:
        if oid not in seen and oid not in pool.objects.destroyed \
                and matches(args[1], pool.objects.by_oid.get(oid)):
            found.append(oid)
    s.find = found
    return []

async def find_on(pool: PoolBackend, m: Member, args: list[Any]) -> list[int]:
    sess, epoch = await m.lease()
    handles: list[int] = []
    broken = False
    try:
        found = await m.search(sess, args[1])  # one round trip, where it can
    except MemberDown:
        await m.release(sess, epoch, True)
        raise
    except BaseException:
        await m.release(sess, epoch, False)
        raise
    if found is not None:
        await m.release(sess, epoch, False)
        return await _ids(pool, m, found)
    try:
        await m.call(ID["C_FindObjectsInit"], [sess, args[1]])
        try:
            while True:
                (batch,) = await m.call(ID["C_FindObjects"], [sess, 256])
                if not isinstance(batch, list) or not batch:
                    break
                handles += batch
                if len(batch) < 256:
                    break
        finally:
            with contextlib.suppress(Pkcs11Error):
                await m.call(ID["C_FindObjectsFinal"], [sess])
    except MemberDown:
        broken = True
        raise
    finally:
        await m.release(sess, epoch, broken)
    return await _ids(pool, m, handles)


async def _ids(pool: PoolBackend, m: Member, handles: list[int]) -> list[int]:
    oids = [await oid_for(pool, m, h) for h in handles]
    # a member's out-of-date copy does not count: its attributes may not be the
    # object's (_find_init lists the object by identity when no good copy is up)
    return [o for o in oids if not pool.objects.is_stale(o, m.name)
            and not hidden(pool, pool.objects.by_oid.get(o))]

def hidden(pool: PoolBackend, key: Key | None) -> bool:
    """The pool's own wrapping key (gateway replication) is not the clients'."""
    return (key is not None and pool.replicator is not None
            and bool(pool.replicator.wrapping_label) and key[0] == ck.CKO_SECRET_KEY
            and key[2] == pool.replicator.wrapping_label)


def matches(template: list[Any], key: Key | None) -> bool:
    """True if ``template`` certainly matches a token object of identity ``key`` (only
    CKA_CLASS, CKA_ID, CKA_LABEL, CKA_UNIQUE_ID and CKA_TOKEN can be judged without the
    object, and CKA_ID and CKA_LABEL only when they are the identity)."""
    if key is None:
        return False
    by_attributes = key[3] is None
    for a in template:
        if a.length is None:
            return False
        if a.type == ck.CKA_CLASS and a.value != key[0]:
            return False
        if a.type == ck.CKA_ID and (not by_attributes or a.value != key[1]):
            return False
        if a.type == ck.CKA_LABEL and (not by_attributes or a.value != key[2]):
            return False
        if a.type == ck.CKA_UNIQUE_ID and a.value != key[3]:
            return False
        if a.type == ck.CKA_TOKEN and not a.value:
            return False
        if a.type not in (ck.CKA_CLASS, ck.CKA_ID, ck.CKA_LABEL, ck.CKA_UNIQUE_ID,
                          ck.CKA_TOKEN):
            return False
    return True

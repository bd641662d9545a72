"""What identities (CKA_CLASS, CKA_ID, CKA_LABEL) a tenant may give token objects.

Namespaces, ownership and pool identities all go by an object's identity, so making an
object *or renaming one* (C_SetAttributeValue of CKA_ID/CKA_LABEL) onto an identity is
the same act and gets the same checks:

* an identity another tenant owns is never taken;
* a namespaced tenant stays inside its namespace (its prefixes, unless it has ``owned``),
  never plants an object inside another tenant's prefix namespace, and never gives an
  object an identity some other object on the token already has (seen or not).

The template alone is checked first (CKR_TEMPLATE_INCONSISTENT: outside the tenant's
namespace), then whether the identity is taken (CKR_ATTRIBUTE_VALUE_INVALID, one code
whether another tenant owns it or an object nobody owns has it): the creator learns "not
allowed", never whose an identity is nor, outside its namespace, whether it exists.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ..codec import Attribute, ckr
from ..codec import constants as ck
from ..errors import Pkcs11Error
from ..policy import Denied
from ..policy.rules import Namespace
from .common import ID, ObjectInfo
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import Session

#: an identity that is taken (owned by another tenant, or held by another object)
TAKEN = ckr.ATTRIBUTE_VALUE_INVALID
#: an identity outside the tenant's namespace, or inside another tenant's
OUTSIDE = ckr.TEMPLATE_INCONSISTENT


def check_new_identity(c: ClientConnection, t: VirtualToken, info: ObjectInfo) -> None:
    """The synchronous checks (ownership, namespace, other tenants' prefixes) for a
    token object about to have, or just given, the identity ``info``."""
    g = c.grants[t]
    ns = g.namespace
    if ns is not None:
        mine = ns.prefix_match(info[2], info[3])
        if not mine and not ns.owned:
            raise Denied(OUTSIDE, g.rule,
                         "an object outside the namespace (CKA_ID/CKA_LABEL prefix)", t.name)
        if not mine and any(other.prefix_match(info[2], info[3])
                            for other in foreign_namespaces(c, t, g.rule)):
            raise Denied(OUTSIDE, g.rule, "an object inside another tenant's namespace",
                         t.name)
    owner = c.gw.ownership.owner(t.name, info[1:])
    if owner is not None and owner != c.identity.key:
        raise Denied(TAKEN, g.rule, "an object identity owned by another tenant", t.name)


def foreign_namespaces(c: ClientConnection, t: VirtualToken, own_rule: str) -> list[Namespace]:
    """The prefix namespaces other rules give on ``t``."""
    out = []
    for rule in c.gw.policy.rules:
        if rule.name == own_rule or rule.namespace is None:
            continue
        if "*" in rule.tokens or t.name in rule.tokens:
            ns = Namespace.from_config(rule.namespace)
            if ns.id_prefix is not None or ns.label_prefix is not None:
                out.append(ns)
    return out


async def count_with_identity(s: Session, info: ObjectInfo, limit: int = 2) -> int:
    """How many token objects on ``s``'s token have this identity (up to ``limit``),
    seen through the gateway's control session: visible to this tenant or not."""
    template = [Attribute(ck.CKA_TOKEN, 1, 1), Attribute(ck.CKA_CLASS, info[1], 8),
                Attribute(ck.CKA_ID, info[2], len(info[2])),
                Attribute(ck.CKA_LABEL, info[3], len(info[3]))]
    t = s.token
    found: object = []
    async with t.control_lock:
        try:
            await t.backend.call(ID["C_FindObjectsInit"], [t.control_session, template])
            (found,) = await t.backend.call(ID["C_FindObjects"], [t.control_session, limit])
        finally:
            with contextlib.suppress(Pkcs11Error):
                await t.backend.call(ID["C_FindObjectsFinal"], [t.control_session])
    return len(found) if isinstance(found, list) else 0


async def check_unique(c: ClientConnection, s: Session, info: ObjectInfo,
                       already: int = 1) -> None:
    """A namespaced tenant may not make an identity another object already has:
    ``already`` objects with it are expected (1 after a creation, 0 before a rename)."""
    if c.grants[s.token].namespace is None:
        return
    if await count_with_identity(s, info, already + 1) > already:
        g = c.grants[s.token]
        raise Denied(TAKEN, g.rule,
                     "an object identity (class, CKA_ID, CKA_LABEL) already in use",
                     s.token.name)

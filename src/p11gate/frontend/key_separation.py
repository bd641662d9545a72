"""Key separation (``[[token]] key_separation = true``): no sequence of calls through
the gateway brings a sensitive key's value out in the clear.

PKCS#11 lets a token hold a key that may both wrap and decrypt. Then any key the client
may wrap can be read: wrap it under that key, decrypt the result (Clulow, CHES 2003).
Its relatives do the same with a wrapping key whose value the client knows (made with
C_CreateObject, unwrapped, derived, or a public key whose private half may decrypt),
with an unwrap that gives the same key back without CKA_SENSITIVE, with attributes
changed between the two calls, or with a derivation that mixes a key with known data.
A module only checks each call on its own; the gateway, which sees every call, makes
these rules (after Bortolozzo, Centenaro, Focardi and Steel, CCS 2010):

* **wrapping** (C_WrapKey): the wrapping key is a secret key made on the token
  (CKA_LOCAL true) and sensitive since then (CKA_ALWAYS_SENSITIVE true): no one outside
  ever had its value; and it may not decrypt;
* **decrypting** (C_DecryptInit, C_MessageDecryptInit): not with a secret key that may
  wrap;
* **roles are fixed**: CKA_WRAP and CKA_DECRYPT cannot be changed (C_SetAttributeValue)
  or given anew to a copy (C_CopyObject), and no template sets CKA_LOCAL;
* **unwrapped keys are sensitive**: C_UnwrapKey with CKA_SENSITIVE false is refused, and
  without it the gateway asks for CKA_SENSITIVE true;
* **no revealing derivations**: the mechanisms that derive a key by mixing the base
  key's value with data or with another key, or by taking its bits, are refused.

Refusals are policy denials (logged, audited, counted) with CKR_KEY_FUNCTION_NOT_PERMITTED
(use), CKR_ATTRIBUTE_READ_ONLY (fixed attributes) or CKR_TEMPLATE_INCONSISTENT
(templates). Keys that exist before the option is switched on are checked at use, like
new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..codec import Attribute, AttrRequest, Call, Mechanism, ckr
from ..codec import constants as ck
from ..errors import Pkcs11Error
from ..policy import Denied
from .common import ID, Stale
from .key_types import key_values
from .translation import revive

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import Session
    from .token import VirtualToken

RULE = "key_separation"

#: the calls checked at use, and the position of the key each one uses
USE_CHECKED: dict[int, int] = {ID["C_WrapKey"]: 2, ID["C_DecryptInit"]: 2,
                               ID["C_MessageDecryptInit"]: 2}
#: attributes no template may set or change once the key exists
FIXED_ROLES = frozenset({ck.CKA_WRAP, ck.CKA_DECRYPT})
#: derivations whose result reveals the base key's value to whoever knows the data
REVEALING_DERIVATIONS = frozenset({
    ck.CKM_CONCATENATE_BASE_AND_KEY, ck.CKM_CONCATENATE_BASE_AND_DATA,
    ck.CKM_CONCATENATE_DATA_AND_BASE, ck.CKM_XOR_BASE_AND_DATA,
    ck.CKM_EXTRACT_KEY_FROM_KEY,
})
SENSITIVE_TRUE = Attribute(ck.CKA_SENSITIVE, 1, 1)

_DERIVE = frozenset({ID["C_DeriveKey"], ID["C_DeriveKey2"]})


def enabled(t: VirtualToken) -> bool:
    return t.cfg.key_separation


def _refuse(rv: int, t: VirtualToken, what: str) -> Denied:
    return Denied(rv, RULE, what, t.name)


def check_templates(t: VirtualToken, call_id: int, args: list[Any],
                    positions: tuple[int, ...]) -> None:
    """The template rules, for a call that makes or changes objects (``positions``: its
    templates). May add CKA_SENSITIVE true to an unwrap template (in ``args``)."""
    if not enabled(t):
        return
    fixed_here = call_id in (ID["C_SetAttributeValue"], ID["C_CopyObject"])
    for pos in positions:
        template: list[Attribute] = args[pos]
        for a in template:
            if a.type == ck.CKA_LOCAL or (fixed_here and a.type in FIXED_ROLES):
                raise _refuse(ckr.ATTRIBUTE_READ_ONLY, t,
                              f"setting attribute {a.type:#x} under key separation")
    if call_id in _DERIVE:
        mech = args[1]
        if isinstance(mech, Mechanism) and mech.type in REVEALING_DERIVATIONS:
            raise _refuse(ckr.MECHANISM_INVALID, t,
                          f"derivation {mech.type:#x}: its result reveals the base key")
    if call_id == ID["C_UnwrapKey"]:
        pos = positions[0]
        template = args[pos]
        sensitive = [a for a in template if a.type == ck.CKA_SENSITIVE]
        if not sensitive:
            args[pos] = [*template, SENSITIVE_TRUE]
        elif sensitive[0].length is None or not sensitive[0].value:
            raise _refuse(ckr.TEMPLATE_INCONSISTENT, t,
                          "unwrapping a key that is not sensitive under key separation")


async def check_use(c: ClientConnection, call: Call, args: list[Any]) -> None:
    """The use rules for C_WrapKey and the decryption inits: the key's class and roles
    are read from the module (they cannot change through the gateway meanwhile: see
    FIXED_ROLES)."""
    pos = USE_CHECKED[call.id]
    s = c.handles.sessions.get(args[0])
    if s is None or not enabled(s.token):
        return
    t = s.token
    for _ in range(4):
        try:
            ref = c.object_for(args[pos], t)
            break
        except Stale as stale:
            await revive(c, stale.ref)
        except Pkcs11Error:
            return  # the call itself gives the right error for a bad handle
    else:
        raise Pkcs11Error(ckr.DEVICE_ERROR, "backend restarting repeatedly")
    roles = await _roles(s, ref.backend_handle)
    is_secret = roles.get(ck.CKA_CLASS) == ck.CKO_SECRET_KEY
    if call.id == ID["C_WrapKey"]:
        if not is_secret:
            raise _refuse(ckr.KEY_FUNCTION_NOT_PERMITTED, t,
                          "wrapping with a key that is not a secret key")
        if roles.get(ck.CKA_LOCAL) is not True:
            raise _refuse(ckr.KEY_FUNCTION_NOT_PERMITTED, t,
                          "wrapping with a key not made on the token (CKA_LOCAL)")
        if roles.get(ck.CKA_ALWAYS_SENSITIVE) is not True:
            # made readable, read, then made sensitive: its value is known
            raise _refuse(ckr.KEY_FUNCTION_NOT_PERMITTED, t,
                          "wrapping with a key that was not always sensitive")
        if roles.get(ck.CKA_DECRYPT) is not False:
            raise _refuse(ckr.KEY_FUNCTION_NOT_PERMITTED, t,
                          "wrapping with a key that may decrypt")
    elif is_secret and roles.get(ck.CKA_WRAP) is not False:
        raise _refuse(ckr.KEY_FUNCTION_NOT_PERMITTED, t,
                      "decrypting with a key that may wrap")


async def _roles(s: Session, backend_handle: int) -> dict[int, Any]:
    """CKA_CLASS, CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_WRAP and CKA_DECRYPT of a key; a
    value the module does not give is missing (each rule then takes the refusing side)."""
    reqs = [AttrRequest(ck.CKA_CLASS, 8), AttrRequest(ck.CKA_LOCAL, 1),
            AttrRequest(ck.CKA_ALWAYS_SENSITIVE, 1), AttrRequest(ck.CKA_WRAP, 1),
            AttrRequest(ck.CKA_DECRYPT, 1)]
    values = await key_values(s, backend_handle, reqs) or {}
    return {kind: v if kind == ck.CKA_CLASS else bool(v) for kind, v in values.items()}


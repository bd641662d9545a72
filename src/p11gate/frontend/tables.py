"""Where handles sit in each call's arguments and replies (by call id).

The frontend is table-driven: these tables say which request positions carry a session,
a slot or an object handle, which carry a mechanism, and which reply positions return a
new object handle that must be given a virtual handle.
"""

from __future__ import annotations

from ..codec.calls import CALLS, CALLS_BY_NAME


def _ids(*names: str) -> frozenset[int]:
    return frozenset(CALLS_BY_NAME[n].id for n in names)


def _id(name: str) -> int:
    return CALLS_BY_NAME[name].id


#: calls whose first argument is a slot id
SLOT_CALLS = _ids(
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_OpenSession", "C_CloseAllSessions", "C_InitToken2",
)

#: calls whose first argument is a session handle
SESSION_CALLS = frozenset(
    c.id for c in CALLS if c.req_codes[:1] == ("u",) and c.id >= 10 and c.id not in SLOT_CALLS
    and c.name not in ("C_WaitForSlotEvent",)
)

#: request positions holding object handles (0 = "no key" is allowed where PKCS#11 does)
OBJECT_ARGS: dict[int, tuple[int, ...]] = {
    _id("C_CopyObject"): (1,),
    _id("C_DestroyObject"): (1,),
    _id("C_GetObjectSize"): (1,),
    _id("C_GetAttributeValue"): (1,),
    _id("C_SetAttributeValue"): (1,),
    _id("C_DigestKey"): (1,),
    _id("C_WrapKey"): (2, 3),
    _id("C_UnwrapKey"): (2,),
    _id("C_DeriveKey"): (2,),
    _id("C_DeriveKey2"): (2,),
    # session, saved state, encryption key, authentication key
    _id("C_SetOperationState"): (2, 3),
}
for _c in CALLS:
    if _c.request == "uMu":  # every *Init with a key
        OBJECT_ARGS[_c.id] = (2,)

_KEY, _WRAPPING, _UNWRAPPING = 0x60, 0x113, 0xF0  # CKR_(UN)(WRAPPING_)KEY_HANDLE_INVALID
#: (call id, position) → the code for an unknown handle where the argument's role is a
#: key (PKCS#11); object calls keep CKR_OBJECT_HANDLE_INVALID
KEY_ARGS: dict[tuple[int, int], int] = {
    **{(c.id, 2): _KEY for c in CALLS if c.request == "uMu"},
    (_id("C_DigestKey"), 1): _KEY,
    (_id("C_WrapKey"), 2): _WRAPPING, (_id("C_WrapKey"), 3): _KEY,
    (_id("C_UnwrapKey"), 2): _UNWRAPPING,
    (_id("C_DeriveKey"), 2): _KEY, (_id("C_DeriveKey2"), 2): _KEY,
    (_id("C_SetOperationState"), 2): _KEY, (_id("C_SetOperationState"), 3): _KEY,
}

#: positions whose handle may be 0 (CK_INVALID_HANDLE means "none")
OPTIONAL_OBJECT_ARGS = {_id("C_SetOperationState")}

#: calls with a mechanism at position 1
MECHANISM_CALLS = frozenset(c.id for c in CALLS if "M" in c.req_codes)

#: reply positions holding new object handles
NEW_OBJECTS: dict[int, tuple[int, ...]] = {
    _id("C_CreateObject"): (0,),
    _id("C_CopyObject"): (0,),
    _id("C_GenerateKey"): (0,),
    _id("C_GenerateKeyPair"): (0, 1),
    _id("C_UnwrapKey"): (0,),
    _id("C_DeriveKey"): (0,),
    _id("C_DeriveKey2"): (2,),
}

#: request positions of templates that create objects, with the object class a missing
#: CKA_CLASS implies for the login rules (None = taken from the template)
CREATE_TEMPLATES: dict[int, tuple[int, ...]] = {
    _id("C_CreateObject"): (1,),
    _id("C_CopyObject"): (2,),
    _id("C_GenerateKey"): (2,),
    _id("C_GenerateKeyPair"): (2, 3),
    _id("C_UnwrapKey"): (4,),
    _id("C_DeriveKey"): (3,),
    _id("C_DeriveKey2"): (3,),
}

#: request positions of output capacities: ``fy`` (bytes) and ``fu`` (ulongs)
CAPACITY_ARGS: dict[int, tuple[tuple[int, int], ...]] = {
    c.id: tuple((i, 8 if code == "fu" else 1) for i, code in enumerate(c.req_codes)
                if code in ("fy", "fu"))
    for c in CALLS
    if "fy" in c.req_codes or "fu" in c.req_codes
}
#: request position of an ``fA`` (C_GetAttributeValue)
ATTR_REQUEST_ARG: dict[int, int] = {
    c.id: c.req_codes.index("fA") for c in CALLS if "fA" in c.req_codes
}

#: calls whose reply carries no handle and is encoded the same in every dialect: a worker's
#: reply body can be relayed to the client as it is
RELAYABLE_REPLIES = frozenset(
    c.id for c in CALLS if c.rep_codes in ((), ("ay",)) and c.id not in NEW_OBJECTS
)

#: calls that use a key (the handle at OBJECT_ARGS[...][0]): policy "use", one audit
#: record each
KEY_USE = frozenset(
    [c.id for c in CALLS if c.request == "uMu"]
    + [_id(n) for n in ("C_WrapKey", "C_UnwrapKey", "C_DeriveKey", "C_DeriveKey2",
                        "C_DigestKey")]
)

#: request positions of attribute templates (``aA``): create, copy, generate, unwrap,
#: derive, set and find. A template that names one attribute type twice is refused before
#: policy or the module see it (the gateway would read the first value, the module the
#: last)
TEMPLATE_ARGS: dict[int, tuple[int, ...]] = {
    c.id: tuple(i for i, code in enumerate(c.req_codes) if code == "aA")
    for c in CALLS
    if "aA" in c.req_codes
}


def _stem(name: str) -> str | None:
    """The operation a call belongs to: C_SignInit, C_Sign, C_SignUpdate and C_SignFinal
    are all "Sign"; C_SignRecoverInit/C_SignRecover are "SignRecover"."""
    for suffix in ("Init", "Update", "Final", ""):
        base = name.removeprefix("C_")
        if suffix and not base.endswith(suffix):
            continue
        base = base.removesuffix(suffix) if suffix else base
        if base in _OPERATIONS:
            return base
    return None


_OPERATIONS = ("Encrypt", "Decrypt", "Digest", "Sign", "SignRecover", "Verify",
               "VerifyRecover")

#: the operation each *Init with a key starts (call id → operation name)
OPERATION_OF_INIT: dict[int, str] = {
    c.id: op for c in CALLS if c.request == "uMu" and c.name.endswith("Init")
    and (op := _stem(c.name)) is not None
}

_MESSAGE_OPS = {
    "C_MessageEncryptInit": "MessageEncrypt", "C_MessageDecryptInit": "MessageDecrypt",
    "C_MessageSignInit": "MessageSign", "C_MessageVerifyInit": "MessageVerify"}
OPERATION_OF_INIT.update({c.id: _MESSAGE_OPS[c.name] for c in CALLS if c.name in _MESSAGE_OPS})
#: C_DigestKey mixes a key's value into a digest operation
OPERATION_OF_INIT[_id("C_DigestKey")] = "Digest"

#: the operations each call continues (single-part, update, final; the dual-function
#: updates continue two)
OPERATION_PHASES: dict[int, tuple[str, ...]] = {
    _id(f"C_{verb}{part}"): (f"Message{verb}",)
    for verb in ("Encrypt", "Decrypt", "Sign", "Verify")
    for part in ("Message", "MessageBegin", "MessageNext")
}
OPERATION_PHASES.update({_id(f"C_Message{verb}Final"): (f"Message{verb}",)
                         for verb in ("Encrypt", "Decrypt", "Sign", "Verify")})
for _c in CALLS:
    if _c.id in OPERATION_OF_INIT or _c.name.endswith("Init") or not _c.name.startswith("C_"):
        continue
    _dual = {"C_DigestEncryptUpdate": ("Digest", "Encrypt"),
             "C_DecryptDigestUpdate": ("Decrypt", "Digest"),
             "C_SignEncryptUpdate": ("Sign", "Encrypt"),
             "C_DecryptVerifyUpdate": ("Decrypt", "Verify")}.get(_c.name)
    if _dual is not None:
        OPERATION_PHASES[_c.id] = _dual
    elif (_op := _stem(_c.name)) is not None and _c.name != "C_DigestKey":
        OPERATION_PHASES[_c.id] = (_op,)

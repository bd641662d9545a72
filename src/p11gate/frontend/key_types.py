"""A key is used only with mechanisms of its family (codec/mechanism_key_types.py).

SoftHSM crashes when C_Sign follows a C_SignInit(CKM_RSA_X_509 / CKM_RSA_PKCS_PSS) it
accepted for an AES, generic-secret or EC key: in process isolation every tenant of the
back end loses its sessions, in-process the gateway dies. p11-kit-client.so passes such
a call on, so the gateway checks: before an operation with an asymmetric mechanism
starts (init, wrap, unwrap, derive), the key's CKA_KEY_TYPE must be one the mechanism
takes. The type is read from the module once per handle and kept on the handle: it is
fixed when a key is made (PKCS#11 §4.7; C_SetAttributeValue cannot change it).

Raw RSA (CKM_RSA_X_509) also crashes SoftHSM when C_Encrypt, C_Sign or C_Verify is given
more bytes than the modulus has: the modulus's length is read with the type, and data
or a signature longer than it is refused (CKR_DATA_LEN_RANGE, CKR_SIGNATURE_LEN_RANGE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..codec import AttrRequest, ckr
from ..codec import constants as ck
from ..codec.call_table import PLANS
from ..codec.mechanism_key_types import KEY_TYPES
from ..errors import Pkcs11Error
from . import precedence
from .common import ID, EndsOperation, KeyTypeUnknown, SlowPath, WrongKeyType
from .tables import OPERATION_OF_INIT

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import ObjectRef, Session

#: ObjectRef.key_type of an object without CKA_KEY_TYPE (not a key)
NO_KEY_TYPE = -1

#: the code for a key of the wrong family, by call (the key's role in it)
_WRONG_TYPE: dict[int, int] = {ID["C_WrapKey"]: ckr.WRAPPING_KEY_TYPE_INCONSISTENT,
               ID["C_UnwrapKey"]: ckr.UNWRAPPING_KEY_TYPE_INCONSISTENT}


#: single-part calls checked after a raw RSA init: operation, data positions and the
#: code for each (the signature of C_Verify is the second)
_RAW_RSA_DATA: dict[int, tuple[str, tuple[tuple[int, int], ...]]] = {
    ID["C_Encrypt"]: ("Encrypt", ((1, ckr.DATA_LEN_RANGE),)),
    ID["C_Sign"]: ("Sign", ((1, ckr.DATA_LEN_RANGE),)),
    ID["C_SignRecover"]: ("SignRecover", ((1, ckr.DATA_LEN_RANGE),)),
    ID["C_Verify"]: ("Verify", ((1, ckr.DATA_LEN_RANGE), (2, ckr.SIGNATURE_LEN_RANGE))),
    ID["C_VerifyRecover"]: ("VerifyRecover", ((1, ckr.SIGNATURE_LEN_RANGE),)),
}
CKM_RSA_X_509 = ck.CKM_RSA_X_509


def check(s: Session, call_id: int, mechanism_type: int, ref: ObjectRef, hot: bool
          ) -> None:
    """Raise unless ``ref`` may be used with ``mechanism_type``; KeyTypeUnknown when
    its type must be read first (see learn). An init that would change a raw RSA data
    limit (one with CKM_RSA_X_509, or another of a kind that has one) takes the slow
    path (SlowPath when ``hot``), which applies the change once the module took the
    init (``started``): a refused init leaves the operation and its limit as they were."""
    allowed = KEY_TYPES.get(mechanism_type)
    if allowed is not None:
        kt = ref.key_type
        if kt is None:
            raise KeyTypeUnknown(ref)
        if kt not in allowed:
            raise WrongKeyType(ref, _WRONG_TYPE.get(call_id, ckr.KEY_TYPE_INCONSISTENT),
                               f"key type {kt:#x} with mechanism {mechanism_type:#x}")
    op = OPERATION_OF_INIT.get(call_id)
    if op is None:
        return
    raw = mechanism_type == CKM_RSA_X_509
    if raw or (s.raw_rsa is not None and op in s.raw_rsa):
        if hot:
            raise SlowPath
        s.raw_rsa_pending = (op, ref.key_size if raw else None)


def started(s: Session, ok: bool) -> None:
    """The init that set ``s.raw_rsa_pending`` ended: taken (``ok``) or refused."""
    pending, s.raw_rsa_pending = s.raw_rsa_pending, None
    if pending is None or not ok:
        return
    op, limit = pending
    if limit is None:
        if s.raw_rsa is not None:
            s.raw_rsa.pop(op, None)
        return
    if s.raw_rsa is None:
        s.raw_rsa = {}
    s.raw_rsa[op] = limit


def check_data(s: Session, call_id: int, args: list[Any]) -> None:
    """A single-part call of an operation started with CKM_RSA_X_509: no more bytes
    than the key's modulus."""
    entry = _RAW_RSA_DATA.get(call_id)
    if entry is None or s.raw_rsa is None:
        return
    limit = s.raw_rsa.get(entry[0])
    if limit is None:
        return
    for pos, code in entry[1]:
        value = args[pos]
        if isinstance(value, bytes | bytearray) and len(value) > limit:
            raise EndsOperation(entry[0], code,
                                f"{len(value)} bytes for a {limit}-byte RSA modulus")


#: the attribute that allows a key's use in each call; a module checks it first
_USAGE: dict[str, int] = {
    "Encrypt": ck.CKA_ENCRYPT, "Decrypt": ck.CKA_DECRYPT, "Sign": ck.CKA_SIGN,
    "SignRecover": ck.CKA_SIGN_RECOVER, "Verify": ck.CKA_VERIFY,
    "VerifyRecover": ck.CKA_VERIFY_RECOVER, "MessageEncrypt": ck.CKA_ENCRYPT,
    "MessageDecrypt": ck.CKA_DECRYPT, "MessageSign": ck.CKA_SIGN,
    "MessageVerify": ck.CKA_VERIFY,
}
_USAGE_OF_CALL: dict[int, int] = {
    ID["C_WrapKey"]: ck.CKA_WRAP, ID["C_UnwrapKey"]: ck.CKA_UNWRAP,
    ID["C_DeriveKey"]: ck.CKA_DERIVE, ID["C_DeriveKey2"]: ck.CKA_DERIVE,
    **{call: _USAGE[op] for call, op in OPERATION_OF_INIT.items() if op in _USAGE},
}


#: calls whose wrong key type the module names before the key's usage attribute
#: (SoftHSM's C_WrapKey / C_UnwrapKey answer CKR_(UN)WRAPPING_KEY_TYPE_INCONSISTENT for a
#: key of another family whether or not it may wrap)
_TYPE_FIRST = frozenset({ID["C_WrapKey"], ID["C_UnwrapKey"]})


async def key_values(s: Session, backend_handle: int, reqs: list[AttrRequest]
                     ) -> dict[int, int] | None:
    """The CK_BBOOL/CK_ULONG attributes ``reqs`` of a key, read through the client's own
    backend session: type → value for those it has; None when it cannot be read."""
    try:
        attrs, _ = await s.token.backend.call(
            ID["C_GetAttributeValue"], [s.backend_handle, backend_handle, reqs])
    except Pkcs11Error:
        return None
    return {a.type: a.value for a in attrs
            if a.length is not None and isinstance(a.value, int)}


async def refusal(s: Session, call_id: int, wrong: WrongKeyType,
                  conn: ClientConnection | None = None) -> Pkcs11Error:
    """The answer to a key of the wrong family. A key that may not be used for this
    at all gets CKR_KEY_FUNCTION_NOT_PERMITTED, as the module answers it before it
    looks at the key's type; else the wrong type's code. (Read only on this path: the
    usage attributes may change, the type may not.) Before both, what the module
    answers whatever the key (an operation already active on the session, a mechanism
    it lacks): asked as for an unknown handle, with CK_INVALID_HANDLE in the key's
    place (precedence.py), so the key never reaches it."""
    if wrong.probe is not None and conn is not None:
        bargs, pos = wrong.probe
        first = await precedence.Unresolved(conn, s, call_id, bargs, pos, wrong.rv).resolve()
        if first.rv != wrong.rv:
            return first
    usage = None if call_id in _TYPE_FIRST else _USAGE_OF_CALL.get(call_id)
    if usage is not None:
        try:
            attrs, _ = await s.token.backend.call(
                ID["C_GetAttributeValue"],
                [s.backend_handle, wrong.ref.backend_handle, [AttrRequest(usage, 1)]])
        except Pkcs11Error as e:
            if e.rv == ckr.OBJECT_HANDLE_INVALID:
                # the key is gone (a session object of a closed session): the code for
                # its role, as for any handle that names nothing
                return Pkcs11Error(PLANS[call_id].unknown_handle_codes[0]
                                   or ckr.KEY_HANDLE_INVALID, "the key is gone")
            attrs = []
        values = {a.type: a.value for a in attrs
                  if a.length is not None and isinstance(a.value, int)}
        # an attribute the key lacks is false to the module (a public key's CKA_SIGN)
        if attrs and not values.get(usage):
            return Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED, "the key may not do this")
    return Pkcs11Error(wrong.rv, wrong.why)


async def learn(s: Session, ref: ObjectRef) -> None:
    """Read ``ref``'s CKA_KEY_TYPE through the client's own backend session."""
    reqs = [AttrRequest(ck.CKA_KEY_TYPE, 8), AttrRequest(ck.CKA_MODULUS, 0)]
    try:
        attrs, _ = await s.token.backend.call(
            ID["C_GetAttributeValue"], [s.backend_handle, ref.backend_handle, reqs])
    except Pkcs11Error as e:
        if e.rv == ckr.OBJECT_HANDLE_INVALID:
            raise Pkcs11Error(ckr.KEY_HANDLE_INVALID) from None
        raise
    kind, modulus = attrs
    ref.key_type = kind.value if kind.length is not None and isinstance(kind.value, int) \
        else NO_KEY_TYPE
    # a size query: the length is the answer; an RSA key without one gets no data
    ref.key_size = modulus.length or 0 if ref.key_type == ck.CKK_RSA else 0

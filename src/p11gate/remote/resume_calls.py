"""What the agent needs to know about each RPC call to map handles and resume it.

The codec's call table (`codec/calls.py`) gives each call's signature; this adds where
session and object handles sit, which calls start, continue and end an operation, and
which may be sent again when the node died before its reply came back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..codec import ckr

#: calls whose first argument is a slot id, not a session
SLOT_CALLS = frozenset({5, 6, 7, 8, 9, 10, 12, 65, 88})
#: calls that carry no handle at all
PLAIN_CALLS = frozenset({1, 2, 3, 4})

#: request arguments holding object handles: call id → ((position, CKR if unknown), …)
OBJECT_ARGS: dict[int, tuple[tuple[int, int], ...]] = {
    # C_SetOperationState: encryption and authentication key (0 = none, see OPTIONAL)
    17: ((2, ckr.KEY_HANDLE_INVALID), (3, ckr.KEY_HANDLE_INVALID)),
    21: ((1, ckr.OBJECT_HANDLE_INVALID),),  # C_CopyObject
    22: ((1, ckr.OBJECT_HANDLE_INVALID),),  # C_DestroyObject
    23: ((1, ckr.OBJECT_HANDLE_INVALID),),  # C_GetObjectSize
    24: ((1, ckr.OBJECT_HANDLE_INVALID),),  # C_GetAttributeValue
    25: ((1, ckr.OBJECT_HANDLE_INVALID),),  # C_SetAttributeValue
    29: ((2, ckr.KEY_HANDLE_INVALID),),  # C_EncryptInit
    33: ((2, ckr.KEY_HANDLE_INVALID),),  # C_DecryptInit
    40: ((1, ckr.KEY_HANDLE_INVALID),),  # C_DigestKey
    42: ((2, ckr.KEY_HANDLE_INVALID),),  # C_SignInit
    46: ((2, ckr.KEY_HANDLE_INVALID),),  # C_SignRecoverInit
    48: ((2, ckr.KEY_HANDLE_INVALID),),  # C_VerifyInit
    52: ((2, ckr.KEY_HANDLE_INVALID),),  # C_VerifyRecoverInit
    60: ((2, ckr.WRAPPING_KEY_HANDLE_INVALID), (3, ckr.KEY_HANDLE_INVALID)),  # C_WrapKey
    61: ((2, 0xF0),),  # C_UnwrapKey (CKR_UNWRAPPING_KEY_HANDLE_INVALID)
    62: ((2, ckr.KEY_HANDLE_INVALID),),  # C_DeriveKey
    89: ((2, ckr.KEY_HANDLE_INVALID),),  # C_DeriveKey2
    68: ((2, ckr.KEY_HANDLE_INVALID),), 73: ((2, ckr.KEY_HANDLE_INVALID),),
    78: ((2, ckr.KEY_HANDLE_INVALID),), 83: ((2, ckr.KEY_HANDLE_INVALID),),
}

#: calls whose object arguments may be CK_INVALID_HANDLE (0) for "none"
OPTIONAL_OBJECTS = frozenset({17})

#: reply values that are new object handles: call id → positions
OBJECT_REPLIES: dict[int, tuple[int, ...]] = {
    20: (0,), 21: (0,), 58: (0,), 59: (0, 1), 61: (0,), 62: (0,),
}
C_FIND_OBJECTS = 27
#: C_DeriveKey2 replies (rv, parameter update, handle): the handle is the third
C_DERIVE_KEY2 = 89
#: mechanisms whose parameter names an object (CONCATENATE_BASE_AND_KEY, ECMQV_DERIVE,
#: X9_42_MQV_DERIVE): the agent does not map handles inside parameters, and passing the
#: application's number to the node could name another object, so it refuses them
HANDLE_MECHANISMS = frozenset({0x360, 0x1052, 0x2033})


@dataclass(frozen=True)
class OpKind:
    """One kind of operation: its Init, the Updates buffered for replay, and the calls
    that end it."""

    name: str
    init: int
    updates: frozenset[int]
    #: single-part and Final calls: they end the operation unless they only asked the
    #: output's size (CKR_BUFFER_TOO_SMALL or a NULL output buffer)
    finals: frozenset[int]
    #: Updates return output that already reached the application: replaying them on
    #: another node could not give the same bytes for every mechanism, so an operation
    #: of this kind with Updates behind it is not resumed
    update_output: bool = False


OP_KINDS = (
    OpKind("sign", 42, frozenset({44}), frozenset({43, 45})),
    OpKind("verify", 48, frozenset({50}), frozenset({49, 51})),
    OpKind("digest", 37, frozenset({39, 40}), frozenset({38, 41})),
    OpKind("encrypt", 29, frozenset({31}), frozenset({30, 32}), update_output=True),
    OpKind("decrypt", 33, frozenset({35}), frozenset({34, 36}), update_output=True),
    OpKind("signrecover", 46, frozenset(), frozenset({47})),
    OpKind("verifyrecover", 52, frozenset(), frozenset({53})),
)
OP_BY_INIT = {k.init: k for k in OP_KINDS}
OP_BY_CALL = {c: k for k in OP_KINDS for c in (k.updates | k.finals)}
#: verify ends whatever it returns (it has no output whose size could be asked)
ALWAYS_ENDS = frozenset({49, 51})
C_FIND_INIT, C_FIND_FINAL = 26, 28

#: calls that change nothing on the token (or only the session state the agent
#: restores): when a node dies before their reply, the agent sends them again to the
#: next node. Everything else (create, copy, destroy, set, generate, unwrap, derive,
#: init token/PIN, set PIN, message calls …) may have happened on the dead node: it
#: fails with CKR_DEVICE_ERROR rather than being done twice.
RESENDABLE = frozenset(
    {3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 18, 19, 23, 24, 26, 27, 28, 60, 63, 64}
    | {k.init for k in OP_KINDS}
    | {c for k in OP_KINDS for c in k.updates | k.finals}
)
C_INITIALIZE, C_FINALIZE = 1, 2
C_OPEN_SESSION, C_CLOSE_SESSION, C_CLOSE_ALL, C_LOGIN, C_LOGOUT = 10, 11, 12, 18, 19
C_GET_ATTRIBUTE_VALUE = 24
C_SET_PIN = 15

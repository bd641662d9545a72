"""The RPC call table (SPEC §3.6): call id → name and exact request/reply signatures."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


def split_signature(sig: str) -> tuple[str, ...]:
    """"uayfy" → ("u", "ay", "fy"): ``a`` and ``f`` begin two-character codes."""
    out: list[str] = []
    i = 0
    while i < len(sig):
        if sig[i] in "af":
            out.append(sig[i : i + 2])
            i += 2
        else:
            out.append(sig[i])
            i += 1
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    name: str
    request: str
    reply: str
    req_codes: tuple[str, ...]
    rep_codes: tuple[str, ...]
    req_sig: bytes
    rep_sig: bytes
    #: sizes of the fixed ``s`` fields, in order, for request and reply
    req_s_sizes: tuple[int, ...] = ()
    rep_s_sizes: tuple[int, ...] = ()


_TABLE: list[tuple[int, str, str, str]] = [
    (0, "ERROR", "", "u"),
    (1, "C_Initialize", "ayyay", ""),
    (2, "C_Finalize", "", ""),
    (3, "C_GetInfo", "", "vsusv"),
    (4, "C_GetSlotList", "yfu", "au"),
    (5, "C_GetSlotInfo", "u", "ssuvv"),
    (6, "C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"),
    (7, "C_GetMechanismList", "ufu", "au"),
    (8, "C_GetMechanismInfo", "uu", "uuu"),
    (9, "C_InitToken", "uayz", ""),
    (10, "C_OpenSession", "uu", "u"),
    (11, "C_CloseSession", "u", ""),
    (12, "C_CloseAllSessions", "u", ""),
    (13, "C_GetSessionInfo", "u", "uuuu"),
    (14, "C_InitPIN", "uay", ""),
    (15, "C_SetPIN", "uayay", ""),
    (16, "C_GetOperationState", "ufy", "ay"),
    (17, "C_SetOperationState", "uayuu", ""),
    (18, "C_Login", "uuay", ""),
    (19, "C_Logout", "u", ""),
    (20, "C_CreateObject", "uaA", "u"),
    (21, "C_CopyObject", "uuaA", "u"),
    (22, "C_DestroyObject", "uu", ""),
    (23, "C_GetObjectSize", "uu", "u"),
    (24, "C_GetAttributeValue", "uufA", "aAu"),
    (25, "C_SetAttributeValue", "uuaA", ""),
    (26, "C_FindObjectsInit", "uaA", ""),
    (27, "C_FindObjects", "ufu", "au"),
    (28, "C_FindObjectsFinal", "u", ""),
    (29, "C_EncryptInit", "uMu", ""),
    (30, "C_Encrypt", "uayfy", "ay"),
    (31, "C_EncryptUpdate", "uayfy", "ay"),
    (32, "C_EncryptFinal", "ufy", "ay"),
    (33, "C_DecryptInit", "uMu", ""),
    (34, "C_Decrypt", "uayfy", "ay"),
    (35, "C_DecryptUpdate", "uayfy", "ay"),
    (36, "C_DecryptFinal", "ufy", "ay"),
    (37, "C_DigestInit", "uM", ""),
    (38, "C_Digest", "uayfy", "ay"),
    (39, "C_DigestUpdate", "uay", ""),
    (40, "C_DigestKey", "uu", ""),
    (41, "C_DigestFinal", "ufy", "ay"),
    (42, "C_SignInit", "uMu", ""),
    (43, "C_Sign", "uayfy", "ay"),
    (44, "C_SignUpdate", "uay", ""),
    (45, "C_SignFinal", "ufy", "ay"),
    (46, "C_SignRecoverInit", "uMu", ""),
    (47, "C_SignRecover", "uayfy", "ay"),
    (48, "C_VerifyInit", "uMu", ""),
    (49, "C_Verify", "uayay", ""),
    (50, "C_VerifyUpdate", "uay", ""),
    (51, "C_VerifyFinal", "uay", ""),
    (52, "C_VerifyRecoverInit", "uMu", ""),
    (53, "C_VerifyRecover", "uayfy", "ay"),
    (54, "C_DigestEncryptUpdate", "uayfy", "ay"),
    (55, "C_DecryptDigestUpdate", "uayfy", "ay"),
    (56, "C_SignEncryptUpdate", "uayfy", "ay"),
    (57, "C_DecryptVerifyUpdate", "uayfy", "ay"),
    (58, "C_GenerateKey", "uMaA", "u"),
    (59, "C_GenerateKeyPair", "uMaAaA", "uu"),
    (60, "C_WrapKey", "uMuufy", "ay"),
    (61, "C_UnwrapKey", "uMuayaA", "u"),
    (62, "C_DeriveKey", "uMuaA", "u"),
    (63, "C_SeedRandom", "uay", ""),
    (64, "C_GenerateRandom", "ufy", "ay"),
    (65, "C_WaitForSlotEvent", "u", "u"),
    (66, "C_LoginUser", "uuayay", ""),
    (67, "C_SessionCancel", "uu", ""),
    (68, "C_MessageEncryptInit", "uMu", ""),
    (69, "C_EncryptMessage", "uayayayfy", "ay"),
    (70, "C_EncryptMessageBegin", "uayay", ""),
    (71, "C_EncryptMessageNext", "uayayfyu", "ay"),
    (72, "C_MessageEncryptFinal", "u", ""),
    (73, "C_MessageDecryptInit", "uMu", ""),
    (74, "C_DecryptMessage", "uayayayfy", "ay"),
    (75, "C_DecryptMessageBegin", "uayay", ""),
    (76, "C_DecryptMessageNext", "uayayfyu", "ay"),
    (77, "C_MessageDecryptFinal", "u", ""),
    (78, "C_MessageSignInit", "uMu", ""),
    (79, "C_SignMessage", "uayayfy", "ay"),
    (80, "C_SignMessageBegin", "uay", ""),
    (81, "C_SignMessageNext", "uayayyfy", "ay"),
    (82, "C_MessageSignFinal", "u", ""),
    (83, "C_MessageVerifyInit", "uMu", ""),
    (84, "C_VerifyMessage", "uayayay", ""),
    (85, "C_VerifyMessageBegin", "uay", ""),
    (86, "C_VerifyMessageNext", "uayayay", ""),
    (87, "C_MessageVerifyFinal", "u", ""),
    (88, "C_InitToken2", "uays", ""),
    (89, "C_DeriveKey2", "uMuaA", "uPu"),
]

# Fixed sizes of ``s`` fields (the receiver rejects any other length).
_S_SIZES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    3: ((), (32, 32)),  # CK_INFO: manufacturerID, libraryDescription
    5: ((), (64, 32)),  # CK_SLOT_INFO: slotDescription, manufacturerID
    6: ((), (32, 32, 16, 16, 16)),  # CK_TOKEN_INFO: label, manuf, model, serial, utcTime
    88: ((32,), ()),  # C_InitToken2 label
}


def _build() -> tuple[Call, ...]:
    out = []
    for cid, name, req, rep in _TABLE:
        req_s, rep_s = _S_SIZES.get(cid, ((), ()))
        out.append(
            Call(
                id=cid,
                name=name,
                request=req,
                reply=rep,
                req_codes=split_signature(req),
                rep_codes=split_signature(rep),
                req_sig=req.encode(),
                rep_sig=rep.encode(),
                req_s_sizes=req_s,
                rep_s_sizes=rep_s,
            )
        )
    return tuple(out)


CALLS: tuple[Call, ...] = _build()
CALLS_BY_NAME: dict[str, Call] = {c.name: c for c in CALLS}
MAX_CALL_ID = len(CALLS) - 1

class CallId(IntEnum):
    """Every call id, named as in PKCS#11 (``CallId.C_Sign``); the same ids as
    ``_TABLE`` (tests/unit/test_call_table.py). What each call's arguments mean is
    in call_table.py."""

    ERROR = 0
    C_Initialize = 1
    C_Finalize = 2
    C_GetInfo = 3
    C_GetSlotList = 4
    C_GetSlotInfo = 5
    C_GetTokenInfo = 6
    C_GetMechanismList = 7
    C_GetMechanismInfo = 8
    C_InitToken = 9
    C_OpenSession = 10
    C_CloseSession = 11
    C_CloseAllSessions = 12
    C_GetSessionInfo = 13
    C_InitPIN = 14
    C_SetPIN = 15
    C_GetOperationState = 16
    C_SetOperationState = 17
    C_Login = 18
    C_Logout = 19
    C_CreateObject = 20
    C_CopyObject = 21
    C_DestroyObject = 22
    C_GetObjectSize = 23
    C_GetAttributeValue = 24
    C_SetAttributeValue = 25
    C_FindObjectsInit = 26
    C_FindObjects = 27
    C_FindObjectsFinal = 28
    C_EncryptInit = 29
    C_Encrypt = 30
    C_EncryptUpdate = 31
    C_EncryptFinal = 32
    C_DecryptInit = 33
    C_Decrypt = 34
    C_DecryptUpdate = 35
    C_DecryptFinal = 36
    C_DigestInit = 37
    C_Digest = 38
    C_DigestUpdate = 39
    C_DigestKey = 40
    C_DigestFinal = 41
    C_SignInit = 42
    C_Sign = 43
    C_SignUpdate = 44
    C_SignFinal = 45
    C_SignRecoverInit = 46
    C_SignRecover = 47
    C_VerifyInit = 48
    C_Verify = 49
    C_VerifyUpdate = 50
    C_VerifyFinal = 51
    C_VerifyRecoverInit = 52
    C_VerifyRecover = 53
    C_DigestEncryptUpdate = 54
    C_DecryptDigestUpdate = 55
    C_SignEncryptUpdate = 56
    C_DecryptVerifyUpdate = 57
    C_GenerateKey = 58
    C_GenerateKeyPair = 59
    C_WrapKey = 60
    C_UnwrapKey = 61
    C_DeriveKey = 62
    C_SeedRandom = 63
    C_GenerateRandom = 64
    C_WaitForSlotEvent = 65
    C_LoginUser = 66
    C_SessionCancel = 67
    C_MessageEncryptInit = 68
    C_EncryptMessage = 69
    C_EncryptMessageBegin = 70
    C_EncryptMessageNext = 71
    C_MessageEncryptFinal = 72
    C_MessageDecryptInit = 73
    C_DecryptMessage = 74
    C_DecryptMessageBegin = 75
    C_DecryptMessageNext = 76
    C_MessageDecryptFinal = 77
    C_MessageSignInit = 78
    C_SignMessage = 79
    C_SignMessageBegin = 80
    C_SignMessageNext = 81
    C_MessageSignFinal = 82
    C_MessageVerifyInit = 83
    C_VerifyMessage = 84
    C_VerifyMessageBegin = 85
    C_VerifyMessageNext = 86
    C_MessageVerifyFinal = 87
    C_InitToken2 = 88
    C_DeriveKey2 = 89


ERROR = CallId.ERROR
C_Initialize = CallId.C_Initialize
C_Finalize = CallId.C_Finalize
C_InitToken = CallId.C_InitToken
C_InitToken2 = CallId.C_InitToken2
C_DeriveKey = CallId.C_DeriveKey
C_DeriveKey2 = CallId.C_DeriveKey2
C_GetAttributeValue = CallId.C_GetAttributeValue
C_SignMessageNext = CallId.C_SignMessageNext

#: the handshake string carried in the first argument of C_Initialize
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

"""The RPC call table (SPEC §3.6): call id → name and exact request/reply signatures."""

from __future__ import annotations

from dataclasses import dataclass


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

ERROR = 0
C_Initialize = 1
C_Finalize = 2
C_InitToken = 9
C_InitToken2 = 88
C_DeriveKey = 62
C_DeriveKey2 = 89
C_GetAttributeValue = 24
C_SignMessageNext = 81

#: the handshake string carried in the first argument of C_Initialize
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

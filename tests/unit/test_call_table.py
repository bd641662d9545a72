"""Issue 11: one call table. It covers every call id of the wire table, and every former
hand-written table is now derived from it and still says the same PKCS#11 facts.

``FORMER`` is the content of the hand-written tables before they were derived (frontend
tables, the pool's call classes, replication's and session rules' sets), frozen here by
call name: a change to the call table that alters one of them fails this test.

The two former ``SLOT_CALLS`` disagreed: the frontend's held every call whose first
argument is a CK_SLOT_ID (PKCS#11 2.40 §5.5-5.6: C_GetSlotInfo, C_GetTokenInfo,
C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_OpenSession, C_CloseAllSessions;
C_InitToken2 is p11-kit's), which is right for "where is the slot"; the pool's held only
the four that *read* a slot, answered from any one member (it routes C_OpenSession and
C_CloseAllSessions itself and refuses C_InitToken). The table keeps the first as
``CallPlan.slot`` and the pool's as ``CallPlan.slot_query``.
"""

from __future__ import annotations

from typing import Any

from p11gate.backends.pool import replication, routes, session_rules
from p11gate.codec.call_table import PLANS, CallId, Phase
from p11gate.codec.calls import CALLS, MAX_CALL_ID
from p11gate.frontend import tables

N = {c.id: c.name for c in CALLS}

FORMER: dict[str, Any] = {'ATTR_REQUEST_ARG': {'C_GetAttributeValue': 2},
 'CAPACITY_ARGS': {'C_Decrypt': ((2, 1),),
                   'C_DecryptDigestUpdate': ((2, 1),),
                   'C_DecryptFinal': ((1, 1),),
                   'C_DecryptMessage': ((4, 1),),
                   'C_DecryptMessageNext': ((3, 1),),
                   'C_DecryptUpdate': ((2, 1),),
                   'C_DecryptVerifyUpdate': ((2, 1),),
                   'C_Digest': ((2, 1),),
                   'C_DigestEncryptUpdate': ((2, 1),),
                   'C_DigestFinal': ((1, 1),),
                   'C_Encrypt': ((2, 1),),
                   'C_EncryptFinal': ((1, 1),),
                   'C_EncryptMessage': ((4, 1),),
                   'C_EncryptMessageNext': ((3, 1),),
                   'C_EncryptUpdate': ((2, 1),),
                   'C_FindObjects': ((1, 8),),
                   'C_GenerateRandom': ((1, 1),),
                   'C_GetMechanismList': ((1, 8),),
                   'C_GetOperationState': ((1, 1),),
                   'C_GetSlotList': ((1, 8),),
                   'C_Sign': ((2, 1),),
                   'C_SignEncryptUpdate': ((2, 1),),
                   'C_SignFinal': ((1, 1),),
                   'C_SignMessage': ((3, 1),),
                   'C_SignMessageNext': ((4, 1),),
                   'C_SignRecover': ((2, 1),),
                   'C_VerifyRecover': ((2, 1),),
                   'C_WrapKey': ((4, 1),)},
 'CREATE_TEMPLATES': {'C_CopyObject': (2,),
                      'C_CreateObject': (1,),
                      'C_DeriveKey': (3,),
                      'C_DeriveKey2': (3,),
                      'C_GenerateKey': (2,),
                      'C_GenerateKeyPair': (2, 3),
                      'C_UnwrapKey': (4,)},
 'KEY_ARGS': {'C_DecryptInit:2': 96,
              'C_DeriveKey2:2': 96,
              'C_DeriveKey:2': 96,
              'C_DigestKey:1': 96,
              'C_EncryptInit:2': 96,
              'C_MessageDecryptInit:2': 96,
              'C_MessageEncryptInit:2': 96,
              'C_MessageSignInit:2': 96,
              'C_MessageVerifyInit:2': 96,
              'C_SetOperationState:2': 96,
              'C_SetOperationState:3': 96,
              'C_SignInit:2': 96,
              'C_SignRecoverInit:2': 96,
              'C_UnwrapKey:2': 240,
              'C_VerifyInit:2': 96,
              'C_VerifyRecoverInit:2': 96,
              'C_WrapKey:2': 275,
              'C_WrapKey:3': 96},
 'KEY_USE': ['C_DecryptInit', 'C_DeriveKey', 'C_DeriveKey2', 'C_DigestKey', 'C_EncryptInit',
             'C_MessageDecryptInit', 'C_MessageEncryptInit', 'C_MessageSignInit',
             'C_MessageVerifyInit', 'C_SignInit', 'C_SignRecoverInit', 'C_UnwrapKey',
             'C_VerifyInit', 'C_VerifyRecoverInit', 'C_WrapKey'],
 'MECHANISM_CALLS': ['C_DecryptInit', 'C_DeriveKey', 'C_DeriveKey2', 'C_DigestInit',
                     'C_EncryptInit', 'C_GenerateKey', 'C_GenerateKeyPair',
                     'C_MessageDecryptInit', 'C_MessageEncryptInit', 'C_MessageSignInit',
                     'C_MessageVerifyInit', 'C_SignInit', 'C_SignRecoverInit', 'C_UnwrapKey',
                     'C_VerifyInit', 'C_VerifyRecoverInit', 'C_WrapKey'],
 'NEW_OBJECTS': {'C_CopyObject': (0,),
                 'C_CreateObject': (0,),
                 'C_DeriveKey': (0,),
                 'C_DeriveKey2': (2,),
                 'C_GenerateKey': (0,),
                 'C_GenerateKeyPair': (0, 1),
                 'C_UnwrapKey': (0,)},
 'OBJECT_ARGS': {'C_CopyObject': (1,),
                 'C_DecryptInit': (2,),
                 'C_DeriveKey': (2,),
                 'C_DeriveKey2': (2,),
                 'C_DestroyObject': (1,),
                 'C_DigestKey': (1,),
                 'C_EncryptInit': (2,),
                 'C_GetAttributeValue': (1,),
                 'C_GetObjectSize': (1,),
                 'C_MessageDecryptInit': (2,),
                 'C_MessageEncryptInit': (2,),
                 'C_MessageSignInit': (2,),
                 'C_MessageVerifyInit': (2,),
                 'C_SetAttributeValue': (1,),
                 'C_SetOperationState': (2, 3),
                 'C_SignInit': (2,),
                 'C_SignRecoverInit': (2,),
                 'C_UnwrapKey': (2,),
                 'C_VerifyInit': (2,),
                 'C_VerifyRecoverInit': (2,),
                 'C_WrapKey': (2, 3)},
 'OPERATION_OF_INIT': {'C_DecryptInit': 'Decrypt',
                       'C_DigestKey': 'Digest',
                       'C_EncryptInit': 'Encrypt',
                       'C_MessageDecryptInit': 'MessageDecrypt',
                       'C_MessageEncryptInit': 'MessageEncrypt',
                       'C_MessageSignInit': 'MessageSign',
                       'C_MessageVerifyInit': 'MessageVerify',
                       'C_SignInit': 'Sign',
                       'C_SignRecoverInit': 'SignRecover',
                       'C_VerifyInit': 'Verify',
                       'C_VerifyRecoverInit': 'VerifyRecover'},
 'OPERATION_PHASES': {'C_Decrypt': ('Decrypt',),
                      'C_DecryptDigestUpdate': ('Decrypt', 'Digest'),
                      'C_DecryptFinal': ('Decrypt',),
                      'C_DecryptMessage': ('MessageDecrypt',),
                      'C_DecryptMessageBegin': ('MessageDecrypt',),
                      'C_DecryptMessageNext': ('MessageDecrypt',),
                      'C_DecryptUpdate': ('Decrypt',),
                      'C_DecryptVerifyUpdate': ('Decrypt', 'Verify'),
                      'C_Digest': ('Digest',),
                      'C_DigestEncryptUpdate': ('Digest', 'Encrypt'),
                      'C_DigestFinal': ('Digest',),
                      'C_DigestUpdate': ('Digest',),
                      'C_Encrypt': ('Encrypt',),
                      'C_EncryptFinal': ('Encrypt',),
                      'C_EncryptMessage': ('MessageEncrypt',),
                      'C_EncryptMessageBegin': ('MessageEncrypt',),
                      'C_EncryptMessageNext': ('MessageEncrypt',),
                      'C_EncryptUpdate': ('Encrypt',),
                      'C_MessageDecryptFinal': ('MessageDecrypt',),
                      'C_MessageEncryptFinal': ('MessageEncrypt',),
                      'C_MessageSignFinal': ('MessageSign',),
                      'C_MessageVerifyFinal': ('MessageVerify',),
                      'C_Sign': ('Sign',),
                      'C_SignEncryptUpdate': ('Sign', 'Encrypt'),
                      'C_SignFinal': ('Sign',),
                      'C_SignMessage': ('MessageSign',),
                      'C_SignMessageBegin': ('MessageSign',),
                      'C_SignMessageNext': ('MessageSign',),
                      'C_SignRecover': ('SignRecover',),
                      'C_SignUpdate': ('Sign',),
                      'C_Verify': ('Verify',),
                      'C_VerifyFinal': ('Verify',),
                      'C_VerifyMessage': ('MessageVerify',),
                      'C_VerifyMessageBegin': ('MessageVerify',),
                      'C_VerifyMessageNext': ('MessageVerify',),
                      'C_VerifyRecover': ('VerifyRecover',),
                      'C_VerifyUpdate': ('Verify',)},
 'OPTIONAL_OBJECT_ARGS': ['C_SetOperationState'],
 'RELAYABLE_REPLIES': ['C_CloseAllSessions', 'C_CloseSession', 'C_Decrypt',
                       'C_DecryptDigestUpdate', 'C_DecryptFinal', 'C_DecryptInit',
                       'C_DecryptMessage', 'C_DecryptMessageBegin', 'C_DecryptMessageNext',
                       'C_DecryptUpdate', 'C_DecryptVerifyUpdate', 'C_DestroyObject',
                       'C_Digest', 'C_DigestEncryptUpdate', 'C_DigestFinal', 'C_DigestInit',
                       'C_DigestKey', 'C_DigestUpdate', 'C_Encrypt', 'C_EncryptFinal',
                       'C_EncryptInit', 'C_EncryptMessage', 'C_EncryptMessageBegin',
                       'C_EncryptMessageNext', 'C_EncryptUpdate', 'C_Finalize',
                       'C_FindObjectsFinal', 'C_FindObjectsInit', 'C_GenerateRandom',
                       'C_GetOperationState', 'C_InitPIN', 'C_InitToken', 'C_InitToken2',
                       'C_Initialize', 'C_Login', 'C_LoginUser', 'C_Logout',
                       'C_MessageDecryptFinal', 'C_MessageDecryptInit',
                       'C_MessageEncryptFinal', 'C_MessageEncryptInit', 'C_MessageSignFinal',
                       'C_MessageSignInit', 'C_MessageVerifyFinal', 'C_MessageVerifyInit',
                       'C_SeedRandom', 'C_SessionCancel', 'C_SetAttributeValue',
                       'C_SetOperationState', 'C_SetPIN', 'C_Sign', 'C_SignEncryptUpdate',
                       'C_SignFinal', 'C_SignInit', 'C_SignMessage', 'C_SignMessageBegin',
                       'C_SignMessageNext', 'C_SignRecover', 'C_SignRecoverInit',
                       'C_SignUpdate', 'C_Verify', 'C_VerifyFinal', 'C_VerifyInit',
                       'C_VerifyMessage', 'C_VerifyMessageBegin', 'C_VerifyMessageNext',
                       'C_VerifyRecover', 'C_VerifyRecoverInit', 'C_VerifyUpdate',
                       'C_WrapKey'],
 'SESSION_CALLS': ['C_CloseSession', 'C_CopyObject', 'C_CreateObject', 'C_Decrypt',
                   'C_DecryptDigestUpdate', 'C_DecryptFinal', 'C_DecryptInit',
                   'C_DecryptMessage', 'C_DecryptMessageBegin', 'C_DecryptMessageNext',
                   'C_DecryptUpdate', 'C_DecryptVerifyUpdate', 'C_DeriveKey', 'C_DeriveKey2',
                   'C_DestroyObject', 'C_Digest', 'C_DigestEncryptUpdate', 'C_DigestFinal',
                   'C_DigestInit', 'C_DigestKey', 'C_DigestUpdate', 'C_Encrypt',
                   'C_EncryptFinal', 'C_EncryptInit', 'C_EncryptMessage',
                   'C_EncryptMessageBegin', 'C_EncryptMessageNext', 'C_EncryptUpdate',
                   'C_FindObjects', 'C_FindObjectsFinal', 'C_FindObjectsInit', 'C_GenerateKey',
                   'C_GenerateKeyPair', 'C_GenerateRandom', 'C_GetAttributeValue',
                   'C_GetObjectSize', 'C_GetOperationState', 'C_GetSessionInfo', 'C_InitPIN',
                   'C_Login', 'C_LoginUser', 'C_Logout', 'C_MessageDecryptFinal',
                   'C_MessageDecryptInit', 'C_MessageEncryptFinal', 'C_MessageEncryptInit',
                   'C_MessageSignFinal', 'C_MessageSignInit', 'C_MessageVerifyFinal',
                   'C_MessageVerifyInit', 'C_SeedRandom', 'C_SessionCancel',
                   'C_SetAttributeValue', 'C_SetOperationState', 'C_SetPIN', 'C_Sign',
                   'C_SignEncryptUpdate', 'C_SignFinal', 'C_SignInit', 'C_SignMessage',
                   'C_SignMessageBegin', 'C_SignMessageNext', 'C_SignRecover',
                   'C_SignRecoverInit', 'C_SignUpdate', 'C_UnwrapKey', 'C_Verify',
                   'C_VerifyFinal', 'C_VerifyInit', 'C_VerifyMessage', 'C_VerifyMessageBegin',
                   'C_VerifyMessageNext', 'C_VerifyRecover', 'C_VerifyRecoverInit',
                   'C_VerifyUpdate', 'C_WrapKey'],
 'SLOT_CALLS': ['C_CloseAllSessions', 'C_GetMechanismInfo', 'C_GetMechanismList',
                'C_GetSlotInfo', 'C_GetTokenInfo', 'C_InitToken', 'C_InitToken2',
                'C_OpenSession'],
 'TEMPLATE_ARGS': {'C_CopyObject': (2,),
                   'C_CreateObject': (1,),
                   'C_DeriveKey': (3,),
                   'C_DeriveKey2': (3,),
                   'C_FindObjectsInit': (1,),
                   'C_GenerateKey': (2,),
                   'C_GenerateKeyPair': (2, 3),
                   'C_SetAttributeValue': (2,),
                   'C_UnwrapKey': (4,)},
 'pool.ENDERS': ['C_Decrypt', 'C_DecryptFinal', 'C_Digest', 'C_DigestFinal', 'C_Encrypt',
                 'C_EncryptFinal', 'C_MessageDecryptFinal', 'C_MessageEncryptFinal',
                 'C_MessageSignFinal', 'C_MessageVerifyFinal', 'C_Sign', 'C_SignFinal',
                 'C_SignRecover', 'C_Verify', 'C_VerifyFinal', 'C_VerifyRecover'],
 'pool.INIT_CALLS': ['C_DecryptInit', 'C_DigestInit', 'C_EncryptInit', 'C_MessageDecryptInit',
                     'C_MessageEncryptInit', 'C_MessageSignInit', 'C_MessageVerifyInit',
                     'C_SignInit', 'C_SignRecoverInit', 'C_VerifyInit',
                     'C_VerifyRecoverInit'],
 'pool.MESSAGE_CALLS': ['C_DecryptMessage', 'C_DecryptMessageBegin', 'C_DecryptMessageNext',
                        'C_EncryptMessage', 'C_EncryptMessageBegin', 'C_EncryptMessageNext',
                        'C_SignMessage', 'C_SignMessageBegin', 'C_SignMessageNext',
                        'C_VerifyMessage', 'C_VerifyMessageBegin', 'C_VerifyMessageNext'],
 'pool.MESSAGE_INITS': ['C_MessageDecryptInit', 'C_MessageEncryptInit', 'C_MessageSignInit',
                        'C_MessageVerifyInit'],
 'pool.OP_CALLS': ['C_Decrypt', 'C_DecryptFinal', 'C_DecryptMessage', 'C_DecryptMessageBegin',
                   'C_DecryptMessageNext', 'C_DecryptUpdate', 'C_Digest', 'C_DigestFinal',
                   'C_DigestKey', 'C_DigestUpdate', 'C_Encrypt', 'C_EncryptFinal',
                   'C_EncryptMessage', 'C_EncryptMessageBegin', 'C_EncryptMessageNext',
                   'C_EncryptUpdate', 'C_MessageDecryptFinal', 'C_MessageEncryptFinal',
                   'C_MessageSignFinal', 'C_MessageVerifyFinal', 'C_Sign', 'C_SignFinal',
                   'C_SignMessage', 'C_SignMessageBegin', 'C_SignMessageNext', 'C_SignRecover',
                   'C_SignUpdate', 'C_Verify', 'C_VerifyFinal', 'C_VerifyMessage',
                   'C_VerifyMessageBegin', 'C_VerifyMessageNext', 'C_VerifyRecover',
                   'C_VerifyUpdate'],
 'pool.SLOT_CALLS': ['C_GetMechanismInfo', 'C_GetMechanismList', 'C_GetSlotInfo',
                     'C_GetTokenInfo'],
 'pool.UNSUPPORTED': ['C_DecryptDigestUpdate', 'C_DecryptVerifyUpdate',
                      'C_DigestEncryptUpdate', 'C_GetOperationState', 'C_InitToken',
                      'C_InitToken2', 'C_SessionCancel', 'C_SetOperationState',
                      'C_SignEncryptUpdate', 'C_WaitForSlotEvent'],
 'pool.UPDATES': ['C_DecryptUpdate', 'C_DigestKey', 'C_DigestUpdate', 'C_EncryptUpdate',
                  'C_SignUpdate', 'C_VerifyUpdate'],
 'replication.DETERMINISTIC': ['C_CopyObject', 'C_CreateObject', 'C_DeriveKey', 'C_UnwrapKey'],
 'replication.EVERYWHERE': ['C_DestroyObject', 'C_SetAttributeValue'],
 'replication.GENERATED': ['C_GenerateKey', 'C_GenerateKeyPair'],
 'session_rules.CREATE_TEMPLATES': {'C_CopyObject': (2,),
                                    'C_CreateObject': (1,),
                                    'C_DeriveKey': (3,),
                                    'C_DeriveKey2': (3,),
                                    'C_GenerateKey': (2,),
                                    'C_GenerateKeyPair': (2, 3),
                                    'C_UnwrapKey': (4,)},
 'session_rules.OBJECT_WRITES': ['C_DestroyObject', 'C_SetAttributeValue']}


def _names(ids: Any) -> list[str]:
    return sorted(N[i] for i in ids)


def _by_name(d: dict[int, Any]) -> dict[str, Any]:
    return {N[k]: v for k, v in sorted(d.items())}


def test_call_table_covers_every_wire_call_id() -> None:
    assert [int(c) for c in CallId] == [c.id for c in CALLS] == list(range(MAX_CALL_ID + 1))
    assert [CallId(c.id).name for c in CALLS] == [c.name for c in CALLS]
    assert len(PLANS) == len(CALLS)
    for cid, plan in enumerate(PLANS):
        assert plan.call.id == cid  # PLANS is indexed by call id
        assert len(plan.object_args) == len(plan.unknown_handle_codes)
        assert not (plan.session and plan.slot)
        if plan.mechanism_arg is not None:
            assert plan.call.req_codes[plan.mechanism_arg] == "M"
        if plan.key_use:
            assert plan.object_args, plan.call.name  # key use names its key


def test_frontend_tables_are_derived_and_unchanged() -> None:
    for name in ("SLOT_CALLS", "SESSION_CALLS", "OPTIONAL_OBJECT_ARGS", "MECHANISM_CALLS",
                 "RELAYABLE_REPLIES", "KEY_USE"):
        assert _names(getattr(tables, name)) == FORMER[name], name
    for name in ("OBJECT_ARGS", "NEW_OBJECTS", "CREATE_TEMPLATES", "CAPACITY_ARGS",
                 "ATTR_REQUEST_ARG", "TEMPLATE_ARGS", "OPERATION_OF_INIT",
                 "OPERATION_PHASES"):
        assert _by_name(getattr(tables, name)) == FORMER[name], name
    assert {f"{N[c]}:{pos}": v for (c, pos), v in sorted(tables.KEY_ARGS.items())} == \
        FORMER["KEY_ARGS"]


def test_pool_classes_are_derived_and_unchanged() -> None:
    for name in ("SLOT_CALLS", "INIT_CALLS", "MESSAGE_INITS", "UPDATES", "ENDERS",
                 "MESSAGE_CALLS", "OP_CALLS", "UNSUPPORTED"):
        assert _names(getattr(routes, name)) == FORMER["pool." + name], name
    for name in ("DETERMINISTIC", "GENERATED", "EVERYWHERE"):
        assert _names(getattr(replication, name)) == FORMER["replication." + name], name
    assert _by_name(session_rules.CREATE_TEMPLATES) == FORMER["session_rules.CREATE_TEMPLATES"]
    assert _names(session_rules.OBJECT_WRITES) == FORMER["session_rules.OBJECT_WRITES"]


def test_slot_calls_disagreement_resolved() -> None:
    """The pool's slot queries are the frontend's slot calls minus the three it handles
    otherwise; the frontend's set is exactly the calls whose first argument is a slot."""
    slot = set(FORMER["SLOT_CALLS"])
    assert set(FORMER["pool.SLOT_CALLS"]) == slot - {
        "C_OpenSession", "C_CloseAllSessions", "C_InitToken", "C_InitToken2"}
    assert {p.call.name for p in PLANS if p.slot} == slot
    assert {p.call.name for p in PLANS if p.slot_query} == set(FORMER["pool.SLOT_CALLS"])


def test_phases_of_a_sign_operation() -> None:
    phases = {n: PLANS[CallId[n]].phase for n in (
        "C_SignInit", "C_SignUpdate", "C_SignFinal", "C_Sign", "C_SignMessage",
        "C_MessageSignFinal", "C_GenerateRandom")}
    assert phases == {"C_SignInit": Phase.INIT, "C_SignUpdate": Phase.UPDATE,
                      "C_SignFinal": Phase.FINAL, "C_Sign": Phase.ONE_SHOT,
                      "C_SignMessage": Phase.MESSAGE, "C_MessageSignFinal": Phase.FINAL,
                      "C_GenerateRandom": Phase.NONE}

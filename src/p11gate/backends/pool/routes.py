"""The call classes a pool routes by, all read from the codec's call table."""

from __future__ import annotations

from ...codec.call_table import PLANS, Phase, ids_where
from .member import ID
from .reconcile import CREATING
from .replication import DETERMINISTIC, EVERYWHERE, GENERATED
from .session_rules import CREATE_TEMPLATES, OBJECT_WRITE_CALLS

SLOT_CALLS = ids_where(lambda p: p.slot_query)
INIT_CALLS = ids_where(lambda p: p.phase is Phase.INIT)
MESSAGE_INITS = ids_where(lambda p: p.phase is Phase.INIT and p.call.request == "uMu"
                          and p.operations[0].startswith("Message"))
UPDATES = ids_where(lambda p: p.phase is Phase.UPDATE and not p.pool_unsupported)
#: calls that end an operation (unless they only asked for the output size)
ENDERS = ids_where(lambda p: p.phase in (Phase.ONE_SHOT, Phase.FINAL))
MESSAGE_CALLS = ids_where(lambda p: p.phase is Phase.MESSAGE)
OP_CALLS = UPDATES | ENDERS | MESSAGE_CALLS
#: not served by pools (state that cannot move between members, or token-wide actions)
UNSUPPORTED = ids_where(lambda p: p.pool_unsupported)

#: calls the pool answers or routes before it looks at members
_ROUTED_FIRST = frozenset(ID[n] for n in (
    "C_GetSlotList", "C_OpenSession", "C_CloseAllSessions", "C_CloseSession", "C_Login",
    "C_LoginUser", "C_Logout", "C_InitPIN", "C_SetPIN", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_DestroyObject", "C_SetAttributeValue"))
#: session calls that need one member session for that one call and nothing before or
#: after it on the pool's side (no operation, no new or changed object, no replication):
#: C_GenerateRandom, C_SeedRandom, C_GetAttributeValue, C_GetObjectSize,
#: C_GetSessionInfo. They may take the direct path (direct.py)
_NOT_DIRECT = (_ROUTED_FIRST | SLOT_CALLS | UNSUPPORTED | INIT_CALLS | OP_CALLS
               | frozenset(CREATE_TEMPLATES) | OBJECT_WRITE_CALLS | CREATING
               | DETERMINISTIC | GENERATED | EVERYWHERE)
DIRECT = frozenset(p.call.id for p in PLANS
                   if p.session and p.call.id not in _NOT_DIRECT
                   and not p.new_objects and p.mechanism_arg is None)
#: answered from the pool's own state, never a member's (a find's results are kept)
ANSWERED_HERE = frozenset(ID[n] for n in ("C_GetSlotList", "C_FindObjects",
                                          "C_FindObjectsFinal"))

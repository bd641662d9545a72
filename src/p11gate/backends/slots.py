"""Finding the configured token among a back end's slots."""

from __future__ import annotations

from ..codec import ckr
from ..codec.calls import CallId
from ..config_select import TokenSelect
from ..errors import BackendUnavailable, Pkcs11Error
from .base import Backend

C_GetSlotList = CallId.C_GetSlotList
C_GetTokenInfo = CallId.C_GetTokenInfo


def pad(text: str | bytes, size: int) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return b[:size].ljust(size, b" ")


async def select_slot(backend: Backend, sel: TokenSelect) -> int:
    """The backend slot holding the token ``sel`` names (by label, serial or index)."""
    slots = (await backend.call(C_GetSlotList, [1, 256]))[0]
    if not isinstance(slots, list):
        raise BackendUnavailable("backend has too many slots")
    if sel.slot_index is not None:
        if sel.slot_index >= len(slots):
            raise Pkcs11Error(ckr.TOKEN_NOT_PRESENT,
                              f"slot_index {sel.slot_index}: backend has {len(slots)} tokens")
        return int(slots[sel.slot_index])
    for s in slots:
        if sel.slot_id is not None and int(s) != sel.slot_id:
            continue  # no need to ask a token that cannot match
        info = await backend.call(C_GetTokenInfo, [s])
        if sel.matches(int(s), info):
            return int(s)
    raise Pkcs11Error(ckr.TOKEN_NOT_PRESENT, f"no token matches {sel.describe()}")

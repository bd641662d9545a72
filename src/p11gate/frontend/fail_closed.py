"""Fail closed when the audit log cannot record what the backend just did.

A key use is audited after the backend answered (the record carries the result). When
that record cannot be written and ``[audit] required`` is on, the client gets the
audit error, and what the backend did must not stay usable:

* an operation an Init started (C_SignInit, C_DecryptInit, …, or the digest C_DigestKey
  fed) is ended on the backend with its single-part call, and a second call confirms
  it ended (CKR_OPERATION_NOT_INITIALIZED); an operation that cannot be ended that way
  costs the client its session;
* objects a key use made (C_UnwrapKey, C_DeriveKey) are destroyed;
* a wrapped key (C_WrapKey) is simply not returned.

The session is *fenced* for that kind of operation at once, in the callback that
answers the Init (see operations.py): continuation calls already queued behind it, as a
client that pipelined C_Sign behind C_SignInit has them, get
CKR_OPERATION_NOT_INITIALIZED, never a signature; the fence lifts when a new Init of
that kind succeeds and is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..audit import AuditError
from ..codec import Call, ckr, encode_error
from ..errors import Pkcs11Error
from .common import ID
from .handles import Session
from .tables import NEW_OBJECTS, OPERATION_OF_INIT

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")


def _data_out(bh: int, cap: int) -> list[Any]:
    return [bh, b"\0", cap]


#: the call that ends the operation each key-use call leaves active, and its arguments
#: (backend session, output capacity). Any result but CKR_BUFFER_TOO_SMALL ends it.
TERMINATORS: dict[int, tuple[int, Callable[[int, int], list[Any]]]] = {
    ID["C_SignInit"]: (ID["C_Sign"], _data_out),
    ID["C_SignRecoverInit"]: (ID["C_SignRecover"], _data_out),
    ID["C_EncryptInit"]: (ID["C_Encrypt"], _data_out),
    ID["C_DecryptInit"]: (ID["C_Decrypt"], _data_out),
    ID["C_VerifyRecoverInit"]: (ID["C_VerifyRecover"], _data_out),
    ID["C_VerifyInit"]: (ID["C_Verify"], lambda bh, cap: [bh, b"\0", b"\0"]),
    ID["C_DigestKey"]: (ID["C_DigestFinal"], lambda bh, cap: [bh, cap]),
}


def unaudited_reply(c: ClientConnection, call: Call, s: Session | None,
                    current: asyncio.Future[Any] | None, err: AuditError) -> bytes:
    """From a done-callback (the hot path): the reply for a key use that succeeded on
    the backend but could not be audited; fences the operation and ends it on the
    backend in the background."""
    op = OPERATION_OF_INIT.get(call.id)
    if s is not None and op is not None:
        if s.fenced is None:
            s.fenced = set()
        s.fenced.add(op)  # synchronous: nothing queued can continue it
        task = asyncio.get_running_loop().create_task(end_operation(c, s, call.id))
        c.gw.background.add(task)
        task.add_done_callback(c.gw.background.discard)
        if s.tail is current:
            s.tail = task  # calls dispatched from now on wait for it
    return encode_error(err.rv)


async def undo_key_use(c: ClientConnection, call: Call, s: Session,
                       reply: list[Any]) -> None:
    """From the async path: undo a key use whose record could not be written (the
    reply still holds backend handles)."""
    new = NEW_OBJECTS.get(call.id)
    if new is not None:
        if call.id == ID["C_DeriveKey2"] and len(reply) < 3:
            return
        for pos in new:
            with contextlib.suppress(Pkcs11Error):
                await s.token.backend.call(ID["C_DestroyObject"],
                                           [s.backend_handle, reply[pos]])
        return
    op = OPERATION_OF_INIT.get(call.id)
    if op is not None:
        if s.fenced is None:
            s.fenced = set()
        s.fenced.add(op)
        await end_operation(c, s, call.id)


async def end_operation(c: ClientConnection, s: Session, call_id: int) -> None:
    term = TERMINATORS.get(call_id)
    if term is not None and s.generation == s.token.backend.generation:
        cid, build = term
        cap = c.gw.cfg.server.max_buffer
        for _ in range(2):  # the first call ends it; the second shows it has ended
            try:
                await s.token.backend.call(cid, build(s.backend_handle, cap))
            except Pkcs11Error as e:
                if e.rv == ckr.OPERATION_NOT_INITIALIZED:
                    log.warning("unaudited operation ended on the backend", extra={
                        "conn": c.id, "token": s.token.name, "call": _name(call_id)})
                    return
    # no single-part call ends it, or it did not end: the session goes
    c.handles.sessions.pop(s.handle, None)
    with contextlib.suppress(Pkcs11Error):
        await s.token.backend.call(ID["C_CloseSession"], [s.backend_handle])
    log.warning("unaudited operation: session closed to end it", extra={
        "conn": c.id, "token": s.token.name, "call": _name(call_id)})


def _name(call_id: int) -> str:
    return next((n for n, i in ID.items() if i == call_id), str(call_id))

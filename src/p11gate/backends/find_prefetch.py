"""Searches on a worker in fewer round trips: C_FindObjectsInit travels with the first
C_FindObjects as one chain (codec.chains), and the client's C_FindObjects calls are
answered from what that first batch returned.

Why: a search is Init, Find, Final: three round trips to the worker process, and each
costs two process wake-ups, most of a cheap call's price on a virtual machine. The Find
that follows an Init is certain, so it goes with it.

The module's own state stays exactly as without this: its search is active from the
Init until the Final (which still goes to it, so an operation started meanwhile gets
the module's own answer), and the batch is what the module's first C_FindObjects gave.
Client Finds take from it in order; once it is used up, a batch shorter than asked
means the module had no more (answered here: an empty list, as the module would), a
full one means it may have more (the next Find goes to the module, which goes on where
it stopped). A failed first Find is not kept: the client's Find goes to the module and
gets its answer.

What is kept is per backend session and dropped at that session's next successful
Init, its Final,
its close (C_CloseSession, C_CloseAllSessions) and the worker's restart, so a session
handle the module hands out again never sees another session's batch. At most
``BATCH`` handles per session.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from ..codec.calls import CALLS_BY_NAME
from ..errors import Pkcs11Error
from .futures import passed_on

#: sends calls as one chain: each call's reply values in order, or its Pkcs11Error, which
#: is then the last item (nothing runs after a failed call)
Chain = Callable[[list[tuple[int, list[Any]]]], "asyncio.Future[list[list[Any] | Pkcs11Error]]"]

C_FindObjectsInit = CALLS_BY_NAME["C_FindObjectsInit"].id
C_FindObjects = CALLS_BY_NAME["C_FindObjects"].id
C_FindObjectsFinal = CALLS_BY_NAME["C_FindObjectsFinal"].id
C_CloseSession = CALLS_BY_NAME["C_CloseSession"].id
C_CloseAllSessions = CALLS_BY_NAME["C_CloseAllSessions"].id

#: the calls that start, read or end what is kept (the worker's submit looks here first)
WATCHED = frozenset((C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal, C_CloseSession,
                     C_CloseAllSessions))
#: the calls answered here or sent as a chain: never relayed raw
NOT_RAW = frozenset((C_FindObjectsInit, C_FindObjects))
#: handles asked for with the Init (and kept, at most, per session)
BATCH = 256


class _Batch:
    __slots__ = ("complete", "handles")

    def __init__(self, handles: list[int], complete: bool) -> None:
        self.handles = handles
        #: the module gave fewer than asked: it has no more
        self.complete = complete


class FindPrefetch:
    """The first batches of the searches running on one worker instance."""

    def __init__(self) -> None:
        self._batches: dict[int, _Batch] = {}

    def clear(self) -> None:
        """The worker (re)started: its sessions are gone."""
        self._batches.clear()

    def __len__(self) -> int:
        return len(self._batches)

    def submit(self, chain: Chain, loop: asyncio.AbstractEventLoop, call_id: int,
               args: list[Any],
               send: Callable[[], asyncio.Future[list[Any]]]) -> asyncio.Future[list[Any]]:
        """``call_id`` (one of WATCHED) with ``args``: a chain, an answer from the batch,
        or ``send()`` (the call as it is) after dropping what it ends."""
        if call_id == C_FindObjects:
            answer = self._take(args)
            if answer is not None:
                fut: asyncio.Future[list[Any]] = loop.create_future()
                fut.set_result([answer])
                return fut
            return send()
        if call_id == C_FindObjectsInit:
            return self._init(chain, loop, args)
        if call_id == C_CloseAllSessions:
            self._batches.clear()
        else:  # C_FindObjectsFinal, C_CloseSession
            self._batches.pop(args[0], None)
        return send()

    def forget(self, call_id: int, args: list[Any]) -> None:
        """A WATCHED call that ends a search is relayed raw: drop what it ends."""
        if call_id == C_CloseAllSessions:
            self._batches.clear()
        elif call_id in (C_FindObjectsFinal, C_CloseSession):
            self._batches.pop(args[0], None)

    def _take(self, args: list[Any]) -> list[int] | None:
        batch = self._batches.get(args[0])
        n = args[1]
        if batch is None or not isinstance(n, int) or n <= 0:
            return None  # nothing kept, or a size query: the module answers
        if batch.handles:
            out = batch.handles[:n]
            del batch.handles[:n]
            return out
        if batch.complete:
            return []
        del self._batches[args[0]]  # a full batch, used up: the module goes on
        return None

    def search(self, chain: Chain, loop: asyncio.AbstractEventLoop, session: int,
               template: list[Any],
               send: Callable[[int, list[Any]], asyncio.Future[list[Any]]],
               ) -> asyncio.Future[list[int] | None]:
        """A whole search in one chain (Init, Find of BATCH, Final), for the gateway's
        own searches (a pool's member search): the handles found, or None when there may
        be more than BATCH (the caller searches call by call instead). A failed Find's
        error is raised after its search is ended on the module."""
        chained = chain([(C_FindObjectsInit, [session, template]),
                         (C_FindObjects, [session, BATCH]),
                         (C_FindObjectsFinal, [session])])
        out: asyncio.Future[list[int] | None] = loop.create_future()

        def ended(e: Pkcs11Error, f: asyncio.Future[Any]) -> None:
            if not out.done():
                out.set_exception(e)
            if not f.cancelled():
                f.exception()  # the Final's own outcome does not matter

        def done(f: asyncio.Future[list[list[Any] | Pkcs11Error]]) -> None:
            if passed_on(f, out):
                return
            replies = f.result()
            if isinstance(replies[0], Pkcs11Error):
                out.set_exception(replies[0])
            elif isinstance(replies[1], Pkcs11Error):
                # the chain stopped before its Final: the module's search is still on
                try:
                    fin = send(C_FindObjectsFinal, [session])
                except Exception:
                    out.set_exception(replies[1])
                    return
                fin.add_done_callback(functools.partial(ended, replies[1]))
            else:
                found = replies[1][0]
                out.set_result(list(found) if isinstance(found, list) and len(found) < BATCH
                               else None)

        chained.add_done_callback(done)
        return out

    def _init(self, chain: Chain, loop: asyncio.AbstractEventLoop,
              args: list[Any]) -> asyncio.Future[list[Any]]:
        session = args[0]
        # what is kept stays until this Init succeeds: a refused one (a search already
        # running: CKR_OPERATION_ACTIVE) leaves the running search as it is
        chained = chain([(C_FindObjectsInit, args), (C_FindObjects, [session, BATCH])])
        out: asyncio.Future[list[Any]] = loop.create_future()

        def done(f: asyncio.Future[list[list[Any] | Pkcs11Error]]) -> None:
            if passed_on(f, out):
                return
            replies = f.result()
            init = replies[0]
            if isinstance(init, Pkcs11Error):
                out.set_exception(init)
                return
            self._batches.pop(session, None)
            if len(replies) > 1 and not isinstance(replies[1], Pkcs11Error):
                found = replies[1][0]
                if isinstance(found, list) and len(found) <= BATCH:
                    self._batches[session] = _Batch(list(found), len(found) < BATCH)
            out.set_result(init)

        chained.add_done_callback(done)
        return out

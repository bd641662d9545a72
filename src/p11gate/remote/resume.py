"""Rebuilding one application's state on another node after its node died.

In this order, each step needing the one before: C_Initialize as the application sent
it; every session opened again with its slot and flags; the login of each slot again
with the kept PIN; every token object found again by its fingerprint; then each
session's operation (Init and the buffered Updates) and search (Init). Whatever cannot
be rebuilt is marked so that the application gets the PKCS#11 error for it on use: a
session object (CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID), an encrypt/decrypt
that had returned output, or an operation past the buffer bound
(CKR_OPERATION_NOT_INITIALIZED), a session the node would not open (CKR_SESSION_CLOSED).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..codec import ReplyError, ckr
from . import resume_calls as rc
from .node_link import NodeLink, NodeLost
from .nodes import Node, NodeSet, NoGateway
from .resume_state import Handles, Session

log = logging.getLogger("p11gate.agent")

#: how long an application's call waits for some node to take over
RESUME_DEADLINE = 30.0
RETRY_PAUSE = 0.25

Translate = Callable[[int, list[Any]], list[Any]]


class Resumer:
    def __init__(self, nodes: NodeSet, handles: Handles, translate: Translate) -> None:
        self.nodes = nodes
        self.h = handles
        self.translate = translate
        self.init_args: list[Any] | None = None
        self.version = 0

    async def connect(self, version: int, exclude: Node | None) -> NodeLink:
        self.version = version
        streams, node = await self.nodes.connect(exclude)
        try:
            return await NodeLink.open(streams, node, version)
        except NodeLost as e:
            self.nodes.release(node)
            self.nodes.mark_down(node, str(e))
            raise

    async def resume(self, old: NodeLink) -> NodeLink:
        """A link to another node with the application's state rebuilt; ConnectionError
        when no node would take it before the deadline."""
        end = time.monotonic() + RESUME_DEADLINE
        exclude: Node | None = old.node
        while True:
            try:
                link = await self.connect(self.version, exclude)
                if link.version != old.version:
                    link.close()
                    self.nodes.release_link(link)
                    raise NoGateway("the node speaks another protocol version")
                await self.rebuild(link)
                return link
            except (NoGateway, NodeLost) as e:
                log.warning("resume attempt failed", extra={"error": str(e)})
                if time.monotonic() > end:
                    raise ConnectionError(str(e)) from None
                exclude = None
                await asyncio.sleep(RETRY_PAUSE)

    async def rebuild(self, link: NodeLink) -> None:
        try:
            await self._rebuild(link)
        except NodeLost:
            self.nodes.release_link(link)
            self.nodes.mark_down(link.node, "lost while resuming")
            link.close()
            raise

    async def _rebuild(self, link: NodeLink) -> None:
        h = self.h
        h.by_node.clear()
        if self.init_args is not None:
            await _ok(link, rc.C_INITIALIZE, self.init_args)
        for s in h.sessions.values():
            try:
                (s.node,) = await link.call(rc.C_OPEN_SESSION, [s.slot, s.flags])
                s.lost = False
            except ReplyError:
                s.lost = True
        for slot, login in list(h.logins.items()):
            first = _session_of(h, slot)
            if first is None:
                continue
            rv = await _rv(link, rc.C_LOGIN, [first.node, login.user_type, login.pin()])
            if rv not in (ckr.OK, ckr.USER_ALREADY_LOGGED_IN):
                # not tried again at the next failover: a PIN that stopped working must
                # not walk the PIN into its lock-out
                h.forget_login(slot)
                log.warning("login could not be restored", extra={"slot": slot,
                                                                   "rv": ckr.name(rv)})
        for app_handle, obj in h.objects.items():
            obj.node = None
            if obj.template is None:
                continue
            finder = next((x for x in h.sessions.values() if not x.lost), None)
            if finder is None:
                continue
            found = await find_one(link, finder.node, obj.template)
            if found is not None:
                obj.node = found
                h.by_node[found] = app_handle
        for s in h.sessions.values():
            if not s.lost:
                await self._replay(link, s)

    async def _replay(self, link: NodeLink, s: Session) -> None:
        op = s.op
        if op is not None:
            s.op = None
            ok = op.resumable and not (op.kind.update_output and op.updates)
            try:
                if ok:
                    await link.call(op.kind.init, self.translate(op.kind.init, op.init_args))
                    for call_id, args in op.updates:
                        await link.call(call_id, self.translate(call_id, args))
                    s.op = op
            except Exception as e:  # Refused (key lost) or ReplyError: not resumable
                if isinstance(e, NodeLost):
                    raise
                ok = False
            if not ok:
                s.lost_op = op.kind
        if s.find is not None:
            try:
                await link.call(rc.C_FIND_INIT,
                                self.translate(rc.C_FIND_INIT, s.find.init_args))
            except NodeLost:
                raise
            except Exception:
                s.find = None
                s.lost_find = True


def _session_of(h: Handles, slot: int) -> Session | None:
    return next((s for s in h.sessions.values() if s.slot == slot and not s.lost), None)


async def _ok(link: NodeLink, call_id: int, args: list[Any]) -> None:
    rv = await _rv(link, call_id, args)
    if rv not in (ckr.OK, 0x191):  # CKR_CRYPTOKI_ALREADY_INITIALIZED
        raise NodeLost(f"call {call_id} refused on resume: {ckr.name(rv)}")


async def _rv(link: NodeLink, call_id: int, args: list[Any]) -> int:
    try:
        await link.call(call_id, args)
    except ReplyError as e:
        return e.rv
    return ckr.OK


async def find_one(link: NodeLink, session: int, template: list[Any]) -> int | None:
    """The node's handle of the one object matching ``template``; None for none or
    several (a fingerprint that is not unique names no object)."""
    try:
        await link.call(rc.C_FIND_INIT, [session, template])
        try:
            (found,) = await link.call(rc.C_FIND_OBJECTS, [session, 2])
        finally:
            await link.call(rc.C_FIND_FINAL, [session])
    except ReplyError:
        return None
    return found[0] if isinstance(found, list) and len(found) == 1 else None

"""One application's connection through the agent, protocol-aware so that it outlives
the node it is on.

Each request is decoded, its session and object handles are mapped from the
application's numbering (see `resume_state`) to the node's, and the reply's new handles
back. A handle the application was never given is refused here, with the CKR the
module would give, and never reaches a node: the maps are per connection, so one
application cannot name another's sessions or objects through the agent. When the node
dies, `resume.failover` rebuilds the state on another node and the call is sent again
when that is safe (`resume_calls.RESENDABLE`); otherwise it fails with CKR_DEVICE_ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..codec import (
    ArgumentError,
    AttrRequest,
    Mechanism,
    Null,
    ProtocolError,
    ReplyError,
    build_frame,
    ckr,
    decode_request,
    encode_error,
    encode_reply,
)
from ..codec.framing import HEADER, HEADER_SIZE, MAX_OPTIONS
from . import resume_calls as rc
from .node_link import NodeLink, NodeLost
from .nodes import NodeSet
from .resume import Resumer, find_one
from .resume_state import Find, Handles, Login, Operation, Session

log = logging.getLogger("p11gate.agent")

MAX_FRAME = 64 * 1024 * 1024
CKU_SO, CKU_USER = 0, 1
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_UNIQUE_ID = 0x0, 0x1, 0x3, 0x4
CKA_KEY_TYPE, CKA_ID = 0x100, 0x102
#: what identifies a token object on every node serving its token
FINGERPRINT = (
    AttrRequest(CKA_TOKEN, 1), AttrRequest(CKA_CLASS, 8), AttrRequest(CKA_KEY_TYPE, 8),
    AttrRequest(CKA_ID, 256), AttrRequest(CKA_LABEL, 256), AttrRequest(CKA_UNIQUE_ID, 256),
)


class Refused(Exception):
    def __init__(self, rv: int) -> None:
        super().__init__(ckr.name(rv))
        self.rv = rv


class AppConnection:
    def __init__(self, nodes: NodeSet, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.nodes = nodes
        self.app_r, self.app_w = reader, writer
        self.h = Handles()
        self.resumer = Resumer(nodes, self.h, self.translate)
        self.link: NodeLink | None = None

    # ------------------------------------------------------------------ serving

    async def serve(self) -> None:
        try:
            version = (await self.app_r.readexactly(1))[0]
            try:
                self.link = await self.resumer.connect(version, None)
            except ConnectionError as e:  # NoGateway, NodeLost
                log.error("no gateway for a local client", extra={"error": str(e)})
                return
            self.app_w.write(bytes([self.link.version]))
            log.info("relaying", extra={"gateway": self.link.node.address})
            while True:
                header = await self.app_r.readexactly(HEADER_SIZE)
                code, olen, blen = HEADER.unpack(header)
                if olen > MAX_OPTIONS or blen > MAX_FRAME or code == 0:
                    log.warning("application sent a bad frame; closing it")
                    return
                rest = await self.app_r.readexactly(olen + blen)
                reply = await self.handle(rest[olen:])
                if reply is None:
                    return
                self.app_w.write(build_frame(code, reply))
                await self.app_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.h.clear()  # forgets (overwrites) the PINs
            if self.link is not None:
                self.nodes.release_link(self.link)
                self.link.close()
            self.app_w.close()

    async def handle(self, body: bytes) -> bytes | None:
        assert self.link is not None
        try:
            call, args = decode_request(body, self.link.dialect)
        except ProtocolError:
            log.warning("application sent a request that does not decode; closing it")
            return None
        except ArgumentError as e:
            return encode_error(e.rv)
        try:
            values = await self.call(call.id, args)
        except Refused as e:
            return encode_error(e.rv)
        except ReplyError as e:
            return encode_error(e.rv)
        return encode_reply(call.id, values, self.link.dialect, args)

    # ------------------------------------------------------------------ mapping

    def session(self, h: int) -> Session:
        s = self.h.sessions.get(h)
        if s is None:
            raise Refused(ckr.SESSION_HANDLE_INVALID)
        if s.lost:
            raise Refused(ckr.SESSION_CLOSED)
        return s

    def translate(self, call_id: int, args: list[Any]) -> list[Any]:
        """The application's arguments with the node's handles (Refused for unknown)."""
        if call_id in rc.PLAIN_CALLS or call_id in rc.SLOT_CALLS:
            return args
        out = list(args)
        out[0] = self.session(args[0]).node
        if len(args) > 1 and isinstance(args[1], Mechanism) \
                and args[1].type in rc.HANDLE_MECHANISMS:
            raise Refused(ckr.MECHANISM_INVALID)
        for pos, rv in rc.OBJECT_ARGS.get(call_id, ()):
            if args[pos] == 0 and call_id in rc.OPTIONAL_OBJECTS:
                continue
            obj = self.h.objects.get(args[pos])
            if obj is None or obj.node is None:
                raise Refused(rv)
            out[pos] = obj.node
        return out

    # ------------------------------------------------------------------ calls

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        s = None if call_id in rc.PLAIN_CALLS or call_id in rc.SLOT_CALLS \
            else self.session(args[0])
        if s is not None:
            self._check_lost_operation(s, call_id)
            await self._find_again(call_id, args, s)
        try:
            values = await self.forward(call_id, args)
        except ReplyError as e:
            self.after_error(call_id, args, s, e.rv)
            raise
        return await self.after_ok(call_id, args, s, values)

    async def forward(self, call_id: int, args: list[Any]) -> list[Any]:
        while True:
            assert self.link is not None
            if self.link.closed():
                if call_id == rc.C_FINALIZE:
                    return []  # the dead node's state is gone anyway
                await self.fail_over("connection closed by the gateway")
                self._check_after_failover(call_id, args)
            node_args = self.translate(call_id, args)
            try:
                return await self.link.call(call_id, node_args)
            except NodeLost as e:
                if call_id == rc.C_FINALIZE:
                    return []
                await self.fail_over(str(e))
                if call_id == rc.C_CLOSE_SESSION:
                    continue  # re-opened by the failover; closed on the new node now
                if call_id not in rc.RESENDABLE:
                    log.warning("node lost during a call that may have taken effect; "
                                "it fails", extra={"call": call_id})
                    raise ReplyError(ckr.DEVICE_ERROR) from None
                self._check_after_failover(call_id, args)

    def _check_after_failover(self, call_id: int, args: list[Any]) -> None:
        if call_id not in rc.SLOT_CALLS and call_id not in rc.PLAIN_CALLS:
            self._check_lost_operation(self.session(args[0]), call_id)

    async def fail_over(self, why: str) -> None:
        assert self.link is not None
        old = self.link
        if not old.released:
            self.nodes.mark_down(old.node, why)
        self.nodes.release_link(old)
        old.close()
        try:
            self.link = await self.resumer.resume(old)
        except ConnectionError:
            self.link = old  # a dead link: the next call tries again
            raise ReplyError(ckr.DEVICE_ERROR) from None
        log.info("resumed on another gateway", extra={
            "from": old.node.address, "gateway": self.link.node.address})

    async def _find_again(self, call_id: int, args: list[Any], s: Session) -> None:
        """A token object the failover did not find (e.g. a private key while the
        application was logged out) is looked for again when it is named."""
        for pos, _ in rc.OBJECT_ARGS.get(call_id, ()):
            obj = self.h.objects.get(args[pos])
            if obj is None or obj.node is not None or obj.template is None or s.lost:
                continue
            assert self.link is not None
            try:
                found = await find_one(self.link, s.node, obj.template)
            except NodeLost:
                return  # forward() notices the closed link and fails over
            if found is not None:
                obj.node = found
                self.h.by_node[found] = args[pos]

    def _check_lost_operation(self, s: Session, call_id: int) -> None:
        kind = rc.OP_BY_CALL.get(call_id)
        if s.lost_op is not None and kind is s.lost_op:
            s.lost_op = None
            raise Refused(ckr.OPERATION_NOT_INITIALIZED)
        if s.lost_find and call_id in (rc.C_FIND_OBJECTS, rc.C_FIND_FINAL):
            s.lost_find = False
            raise Refused(ckr.OPERATION_NOT_INITIALIZED)

    # ------------------------------------------------------------------ bookkeeping

    def after_error(self, call_id: int, args: list[Any], s: Session | None, rv: int) -> None:
        if s is None:
            return
        if call_id in rc.OP_BY_INIT:
            s.op = None
        elif call_id in rc.OP_BY_CALL and rv != ckr.BUFFER_TOO_SMALL:
            s.op = None  # an error ends the operation (PKCS#11 §5.2)
        elif call_id == rc.C_CLOSE_SESSION and rv in (ckr.SESSION_HANDLE_INVALID,
                                                       ckr.SESSION_CLOSED):
            self.h.drop_session(args[0])

    async def after_ok(self, call_id: int, args: list[Any], s: Session | None,
                       values: list[Any]) -> list[Any]:
        h = self.h
        if call_id == rc.C_INITIALIZE:
            self.resumer.init_args = list(args)
        elif call_id == rc.C_FINALIZE:
            h.clear()
            self.resumer.init_args = None
        elif call_id == rc.C_OPEN_SESSION:
            return [h.add_session(Session(args[0], args[1], values[0]))]
        elif call_id == rc.C_CLOSE_SESSION:
            h.drop_session(args[0])
        elif call_id == rc.C_CLOSE_ALL:
            h.drop_slot(args[0])
        if s is None:
            return values
        if call_id == rc.C_LOGIN and args[1] in (CKU_SO, CKU_USER) \
                and isinstance(args[2], bytes):
            h.forget_login(s.slot)
            h.logins[s.slot] = Login(args[1], args[2])
        elif call_id == rc.C_LOGOUT:
            h.forget_login(s.slot)
        elif call_id == rc.C_SET_PIN and s.slot in h.logins and isinstance(args[2], bytes):
            # the logged-in user changed its own PIN: a re-login must use the new one
            user_type = h.logins[s.slot].user_type
            h.forget_login(s.slot)
            h.logins[s.slot] = Login(user_type, args[2])
        elif call_id in rc.OP_BY_INIT:
            s.op = Operation(rc.OP_BY_INIT[call_id], list(args))
        elif call_id in rc.OP_BY_CALL and s.op is not None:
            if call_id in s.op.kind.updates:
                s.op.add_update(call_id, list(args))
            elif call_id in rc.ALWAYS_ENDS or not isinstance(values[0], Null):
                s.op = None
        elif call_id == rc.C_FIND_INIT:
            s.find = Find(list(args))
        elif call_id == rc.C_FIND_FINAL:
            s.find = None
        elif call_id == rc.C_FIND_OBJECTS:
            return [await self._found(s, args, values[0])]
        elif call_id == 22:  # C_DestroyObject
            obj = h.objects.pop(args[1], None)
            if obj is not None and obj.node is not None:
                h.by_node.pop(obj.node, None)
        if call_id == rc.C_DERIVE_KEY2 and len(values) == 3:
            return [values[0], values[1], await self.app_object(s, values[2])]
        if call_id in rc.OBJECT_REPLIES:
            out = list(values)
            for pos in rc.OBJECT_REPLIES[call_id]:
                out[pos] = await self.app_object(s, values[pos])
            return out
        return values

    async def _found(self, s: Session, args: list[Any], found: Any) -> Any:
        if not isinstance(found, list):
            return found
        handles = [await self.app_object(s, n) for n in found]
        if s.find is None:
            return handles
        fresh = [x for x in handles if x not in s.find.delivered]
        while not fresh and handles:
            # a search replayed on a new node returns what was delivered already first
            assert self.link is not None
            (more,) = await self.forward(rc.C_FIND_OBJECTS, args)
            handles = [await self.app_object(s, n) for n in (more or [])]
            fresh = [x for x in handles if x not in s.find.delivered]
        s.find.delivered.update(fresh)
        return fresh

    async def app_object(self, s: Session, node_handle: int) -> int:
        """The application's handle for a node's object handle, made on first sight with
        the object's fingerprint (one C_GetAttributeValue)."""
        known = self.h.by_node.get(node_handle)
        if known is not None:
            return known
        template = None
        assert self.link is not None
        try:
            attrs, _rv = await self.link.call(
                rc.C_GET_ATTRIBUTE_VALUE, [s.node, node_handle, list(FINGERPRINT)])
            usable = [a for a in attrs if a.length is not None and a.value is not None]
            token = [a for a in usable if a.type == CKA_TOKEN]
            if token and token[0].value:
                template = usable
        except (ReplyError, NodeLost):
            pass  # not resumable; it still works on this node
        return self.h.add_object(node_handle, template)

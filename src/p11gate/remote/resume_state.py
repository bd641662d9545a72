"""What one application holds through the agent, kept so it can be rebuilt on another
node: its sessions, the objects whose handles it got, its login and its operations.

Handles the application sees are the agent's own (one numbering per application
connection), never a node's: after a failover the agent points them at the new node's
handles, and a handle the application was never given does not exist here at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..codec import Attribute
from .resume_calls import OpKind

#: bound on the multi-part input buffered for one operation; past it the operation
#: is no longer resumable (it still works on its node)
MAX_BUFFERED = 16 * 1024 * 1024


@dataclass
class Operation:
    kind: OpKind
    #: the Init's arguments, with the application's handles
    init_args: list[Any]
    #: Updates that succeeded since the Init: (call id, arguments)
    updates: list[tuple[int, list[Any]]] = field(default_factory=list)
    buffered: int = 0
    resumable: bool = True

    def add_update(self, call_id: int, args: list[Any]) -> None:
        if not self.resumable:
            return
        size = sum(len(a) for a in args if isinstance(a, bytes))
        if self.kind.update_output or self.buffered + size > MAX_BUFFERED:
            self.resumable = False
            self.updates.clear()
            return
        self.updates.append((call_id, args))
        self.buffered += size


@dataclass
class Find:
    init_args: list[Any]
    #: application handles already returned by C_FindObjects (a replayed search on a
    #: new node must not return them again)
    delivered: set[int] = field(default_factory=set)


@dataclass
class Session:
    slot: int
    flags: int
    node: int
    op: Operation | None = None
    find: Find | None = None
    #: an operation the failover could not bring along: its next call gets
    #: CKR_OPERATION_NOT_INITIALIZED
    lost_op: OpKind | None = None
    lost_find: bool = False
    #: could not be opened again on the new node
    lost: bool = False


@dataclass
class Object:
    #: handle on the current node; None: not on this node (a session object of a dead
    #: node, or a token object the new node does not have)
    node: int | None
    #: the attributes it is found by on another node; None for a session object
    template: list[Attribute] | None


class Login:
    """A PIN kept in memory only, in a bytearray that is overwritten when forgotten (the
    bytes object the codec decoded it from is garbage; Python offers no better)."""

    __slots__ = ("_pin", "user_type")

    def __init__(self, user_type: int, pin: bytes) -> None:
        self.user_type = user_type
        self._pin = bytearray(pin)

    def pin(self) -> bytes:
        return bytes(self._pin)

    def forget(self) -> None:
        for i in range(len(self._pin)):
            self._pin[i] = 0
        self._pin = bytearray()

    def __repr__(self) -> str:
        return f"Login(user_type={self.user_type}, pin=<hidden>)"


class Handles:
    """The agent's numbering of one application's sessions and objects."""

    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}
        self.objects: dict[int, Object] = {}
        #: node object handle → application handle, for the current node
        self.by_node: dict[int, int] = {}
        self.logins: dict[int, Login] = {}
        self._next_session = 1
        self._next_object = 1

    def add_session(self, s: Session) -> int:
        h = self._next_session
        self._next_session += 1
        self.sessions[h] = s
        return h

    def add_object(self, node: int, template: list[Attribute] | None) -> int:
        h = self._next_object
        self._next_object += 1
        self.objects[h] = Object(node, template)
        self.by_node[node] = h
        return h

    def drop_session(self, h: int) -> None:
        s = self.sessions.pop(h, None)
        if s is not None and not any(x.slot == s.slot for x in self.sessions.values()):
            self.forget_login(s.slot)  # the last session of a slot ends its login

    def drop_slot(self, slot: int) -> None:
        for h in [h for h, s in self.sessions.items() if s.slot == slot]:
            del self.sessions[h]
        self.forget_login(slot)

    def forget_login(self, slot: int) -> None:
        login = self.logins.pop(slot, None)
        if login is not None:
            login.forget()

    def clear(self) -> None:
        for slot in list(self.logins):
            self.forget_login(slot)
        self.sessions.clear()
        self.objects.clear()
        self.by_node.clear()

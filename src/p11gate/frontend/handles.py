"""Virtual handles: the session and object handles one client connection sees.

They are minted by the gateway and mapped to (token, backend instance, backend handle).
A handle from another connection, or from a backend instance that has since died, is
simply not in this table.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..codec import Attribute

if TYPE_CHECKING:
    from .token import VirtualToken


IDENTITY_UNKNOWN, IDENTITY_PENDING, IDENTITY_KNOWN, IDENTITY_NONE = range(4)


class Session:
    __slots__ = ("auth_key", "backend_handle", "fenced", "find", "flags", "generation",
                 "handle", "private_ops", "raw_rsa", "raw_rsa_pending", "tail", "token")

    def __init__(
        self, handle: int, token: VirtualToken, backend_handle: int, generation: int, flags: int
    ) -> None:
        self.handle = handle
        self.token = token
        self.backend_handle = backend_handle
        self.generation = generation
        self.flags = flags
        #: None, "backend" (a find is active on the backend) or "empty" (answered locally)
        self.find: str | None = None
        #: the last queued call on this session: calls on one session run in order
        self.tail: asyncio.Future[None] | None = None
        #: operations started with a (maybe) private key while logged in: ended at logout
        self.private_ops: set[str] | None = None
        #: operations ended at a logout: their continuation calls are refused until a new
        #: one of the kind starts (see operations.py)
        self.fenced: set[str] | None = None
        #: the key of the last operation started with one (a CKU_CONTEXT_SPECIFIC login
        #: re-authenticates for it when it has CKA_ALWAYS_AUTHENTICATE)
        self.auth_key: ObjectRef | None = None
        #: operation kind → the most bytes its data may have (raw RSA: the modulus's),
        #: for the operations started with CKM_RSA_X_509 (frontend/key_types.py)
        self.raw_rsa: dict[str, int] | None = None
        #: the change an init under way makes to raw_rsa, applied if the module takes it
        self.raw_rsa_pending: tuple[str, int | None] | None = None


class ObjectRef:
    __slots__ = ("backend_handle", "generation", "handle", "identity", "identity_state",
                 "key_size", "key_type", "private", "token")

    def __init__(
        self,
        handle: int,
        token: VirtualToken,
        backend_handle: int,
        generation: int,
        private: bool | None,
    ) -> None:
        self.handle = handle
        self.token = token
        self.backend_handle = backend_handle
        self.generation = generation
        #: None = not known (minted while logged in); resolved at logout
        self.private = private
        #: CKA_CLASS/CKA_ID/CKA_LABEL of a token object, to find it again on a new
        #: backend instance (after a worker restart)
        self.identity: list[Attribute] | None = None
        self.identity_state = IDENTITY_UNKNOWN
        #: CKA_KEY_TYPE once read (frontend/key_types.py; it never changes), NO_KEY_TYPE
        #: for an object that has none, None before it is needed
        self.key_type: int | None = None
        #: an RSA key's modulus in bytes, read with its type (0: not an RSA key)
        self.key_size = 0


#: tasks inside :func:`settle`: one never waits for another that waits for it
_settling: set[asyncio.Future[object]] = set()
#: the session whose call the current task serves (set by the connection's _run): the
#: calls before it on that session have ended, the ones after it wait for it
RUNNING_ON: ContextVar[Session | None] = ContextVar("p11gate_running_on", default=None)


async def settle(s: Session, tail: asyncio.Future[None] | None = None) -> None:
    """Wait until no call of the client's is in flight or queued on ``s`` (its tail;
    or only until ``tail``, a tail taken before, and the calls before it, have ended).
    A module must never see its session closed, or an operation on it ended, under a
    call still running on it: SoftHSM frees the session's operation under the running
    call (the worker, or in-process the gateway, crashed), and a call queued behind the
    fair share would start on a session number the module may have given to another
    application meanwhile."""
    if s is RUNNING_ON.get():
        return
    me = asyncio.current_task()
    if me is not None:
        _settling.add(me)
    try:
        follow = tail is None
        tail = s.tail if follow else tail
        while (tail is not None and not tail.done() and tail is not me
               and tail not in _settling):
            await asyncio.wait((tail,))
            tail = s.tail if follow else None
    finally:
        if me is not None:
            _settling.discard(me)


class HandleTable:
    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}
        self.objects: dict[int, ObjectRef] = {}
        self._by_backend: dict[tuple[int, int, int], int] = {}
        self._next_session = 1
        self._next_object = 1

    def add_session(
        self, token: VirtualToken, backend_handle: int, generation: int, flags: int
    ) -> Session:
        h = self._next_session
        self._next_session += 1
        s = Session(h, token, backend_handle, generation, flags)
        self.sessions[h] = s
        return s

    def object_for(
        self, token: VirtualToken, backend_handle: int, generation: int, private: bool | None
    ) -> int:
        key = (id(token), generation, backend_handle)
        h = self._by_backend.get(key)
        if h is not None:
            # the backend may have reused the number for another object (a session
            # object that died with its session): trust only what is known now
            self.objects[h].private = private
            return h
        h = self._next_object
        self._next_object += 1
        self.objects[h] = ObjectRef(h, token, backend_handle, generation, private)
        self._by_backend[key] = h
        return h

    def rebind(self, ref: ObjectRef, backend_handle: int, generation: int) -> None:
        """The object was found again on a new backend instance: same virtual handle."""
        self._by_backend.pop((id(ref.token), ref.generation, ref.backend_handle), None)
        ref.backend_handle = backend_handle
        ref.generation = generation
        self._by_backend[(id(ref.token), generation, backend_handle)] = ref.handle

    def drop_object(self, handle: int) -> None:
        ref = self.objects.pop(handle, None)
        if ref is not None:
            self._by_backend.pop((id(ref.token), ref.generation, ref.backend_handle), None)

    def objects_of(self, token: VirtualToken) -> list[ObjectRef]:
        return [r for r in self.objects.values() if r.token is token]

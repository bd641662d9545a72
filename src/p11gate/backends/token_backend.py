"""What the back ends that answer calls from one in-process token object share.

The soft and KMIP back ends each keep a token object and a table from call id to handler;
a call is checked the same way in both before its handler runs (back end running, call
known, argument count), so that a client sees the same CK_RV from either for the same
mistake. What they do around the handler (errors, refreshing) stays their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

from ..codec import ckr
from ..codec.calls import CALLS, CALLS_BY_NAME
from ..errors import BackendUnavailable, Pkcs11Error
from .base import Backend

T = TypeVar("T")

#: one call's handler: the token and the request's arguments → the reply values (or an
#: awaitable of them, for handlers that run in threads or wait on a server)
TokenHandler: TypeAlias = Callable[[T, list[Any]], list[Any] | Awaitable[list[Any]]]


def call_id(name: str) -> int:
    """The call id of ``name`` (``"C_Sign"``), for building handler tables."""
    return CALLS_BY_NAME[name].id


def method(name: str) -> TokenHandler[Any]:
    """A handler that passes the arguments to the token's method ``name``.

    Looked up on each call, not bound once, so that one table serves every token object
    (and subclasses that override the method)."""
    def call(t: Any, args: list[Any]) -> list[Any] | Awaitable[list[Any]]:
        fn: Callable[[list[Any]], list[Any] | Awaitable[list[Any]]] = getattr(t, name)
        return fn(args)
    return call


class TokenBackend(Backend, Generic[T]):
    """A back end answering from ``_token`` (None while not running)."""

    _token: T | None

    @property
    def up(self) -> bool:
        return self._token is not None

    def _token_and_handler(self, handlers: Mapping[int, TokenHandler[T]], call_id: int,
                           args: list[Any]) -> tuple[T, TokenHandler[T]]:
        """The token and the handler for ``call_id``, or the error the client gets:
        BackendUnavailable when not running, CKR_RANDOM_SEED_NOT_SUPPORTED for
        C_SeedRandom and CKR_FUNCTION_NOT_SUPPORTED for any other call without a
        handler, CKR_ARGUMENTS_BAD when the argument count is not the call's."""
        token = self._token
        if token is None:
            raise BackendUnavailable(f"backend {self.name} is not running")
        handler = handlers.get(call_id)
        if handler is None:
            if 0 <= call_id < len(CALLS) and CALLS[call_id].name == "C_SeedRandom":
                raise Pkcs11Error(ckr.RANDOM_SEED_NOT_SUPPORTED)
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED)
        # a request with the wrong number of arguments never reaches a handler
        if len(args) != len(CALLS[call_id].req_codes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "argument count")
        return token, handler


#: bytes of operation data (multi-part input, GCM additional data, results kept for a
#: size query's retry) one in-process token holds across all its sessions. Each session
#: may hold about a MiB per operation kind; with thousands of sessions per identity
#: that was gigabytes in the gateway's own memory, taken by one local user.
MAX_HELD = 256 << 20


class HeldBudget:
    """The operation data a token holds, bounded by ``limit``.

    ``take`` adds what a call made the token hold (an addition per call); only when that
    running count passes the limit is the exact amount counted again (``recount``: what
    ended meanwhile is not subtracted as it ends), so the count is never below the truth.
    Past the limit the call gets CKR_DEVICE_MEMORY: the caller ends that operation."""

    def __init__(self, recount: Callable[[], int], limit: int = MAX_HELD,
                 parent: HeldBudget | None = None) -> None:
        self.recount, self.limit, self.count = recount, limit, 0
        #: a budget this one is part of (a layered soft token: one identity's tokens
        #: within the back end's): what is taken here is taken there too
        self.parent = parent

    def take(self, n: int) -> None:
        """Count ``n`` more bytes held (already held: ``recount`` includes them)."""
        self.count += n
        if self.count > self.limit:
            self.count = self.recount()
            if self.count > self.limit:
                raise Pkcs11Error(ckr.DEVICE_MEMORY, "operation data held by the token")
        if self.parent is not None:
            self.parent.take(n)

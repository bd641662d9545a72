"""The one interface every back end implements.

It is PKCS#11 shaped, with the codec's plain values: ``call(call_id, args)`` takes the
arguments of the RPC request for that call id (see ``codec.calls``: ``u`` → int, ``ay`` →
bytes/Null/None, ``fy`` → capacity int, ``aA`` → list[Attribute], ``M`` → Mechanism, …) and
returns the reply values, exactly as an RPC server would put them on the wire:

* output buffers (``ay``/``au``) are ``bytes``/``list`` when filled, ``Null(n)`` for a
  size query (capacity 0) *and* for CKR_BUFFER_TOO_SMALL (carried as data, SPEC §3.4);
* C_GetAttributeValue returns ``[attributes, rv]`` for CKR_OK, ATTRIBUTE_SENSITIVE,
  ATTRIBUTE_TYPE_INVALID and BUFFER_TOO_SMALL;
* C_DeriveKey2 returns ``[rv, ParamUpdate, handle]`` (or ``[rv, ParamUpdate]`` for
  CKR_BUFFER_TOO_SMALL);
* any other CK_RV raises :class:`p11gate.errors.Pkcs11Error`; a dead, hung or restarting
  back end raises :class:`p11gate.errors.BackendUnavailable`.

Handles are the back end's own; the frontend maps them. C_Initialize/C_Finalize are the
back end's business (done in ``start``/``stop``), never forwarded from clients.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any


class Backend(ABC):
    name: str
    #: incremented every time the back end (re)starts; handles from an older
    #: generation are dead
    generation: int = 0
    #: called (no arguments) after a restart, so owners can re-establish state
    on_restart: Callable[[], Awaitable[None]] | None = None
    #: vendor mechanisms whose raw parameter bytes the operator lets reach this back
    #: end's module (config ``raw_parameter_mechanisms``; see codec.param_kinds)
    raw_parameter_mechanisms: frozenset[int] = frozenset()

    @abstractmethod
    async def start(self) -> None:
        """Load/initialize the module; raise on failure."""

    @abstractmethod
    async def stop(self) -> None:
        """Finalize and release everything."""

    @abstractmethod
    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """Perform one PKCS#11 call (see module docstring)."""

    def submit(self, call_id: int, args: list[Any]) -> asyncio.Future[list[Any]]:
        """Start one call and return a future of its reply values, without a coroutine
        frame or a task: the frontend's hot path uses this. Raises (synchronously)
        BackendUnavailable when the back end is down. Back ends override it when they
        can do better than wrapping :meth:`call`."""
        return asyncio.ensure_future(self.call(call_id, args))

    @property
    @abstractmethod
    def up(self) -> bool:
        """True while calls can be made."""

    def submit_raw(self, call_id: int, args: list[Any]) -> asyncio.Future[bytes] | None:
        """For back ends that speak the RPC protocol in the client's encoding: start a
        call whose reply body can be relayed verbatim. None = not supported (the caller
        uses :meth:`submit`)."""
        return None

    def submit_body(self, call_id: int, body: bytes, dialect: Any) -> asyncio.Future[bytes] | None:
        """Like :meth:`submit_raw`, for a request already encoded in ``dialect`` (a
        :class:`~p11gate.codec.Dialect`, the client's): relayed byte for byte, no decode
        and re-encode, when the back end speaks that dialect. None = not possible (the
        caller encodes the arguments and uses :meth:`submit_raw` or :meth:`submit`)."""
        return None

    def submit_search(self, session: int,
                      template: list[Any]) -> asyncio.Future[list[int] | None] | None:
        """A whole search (Init, Find, Final) for the gateway's own use, in one round
        trip where the back end can: the handles found, or None when there may be more
        than one batch. None instead of a future = not supported (search call by call)."""
        return None

    async def wait_up(self, timeout: float) -> bool:
        """Wait (bounded) for a restarting back end to come back; True if it is up.
        Used before calls that start something new (C_OpenSession, slot queries), so
        that only calls in flight when a back end died see an error."""
        return self.up

    def describe(self) -> dict[str, Any]:
        """Status for `p11gate status` and logs."""
        return {"name": self.name, "up": self.up, "generation": self.generation}

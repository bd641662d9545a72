"""Error precedence for handles the gateway cannot translate.

A module refuses some calls for reasons that do not depend on the key handle: the
function is not supported (SoftHSM's C_SignRecoverInit), the mechanism is not one it
has, no operation is active for C_DigestKey. A client that passes an unknown handle must
get that reason, as it would from the module directly, not the gateway's
CKR_KEY_HANDLE_INVALID from handle translation.

When translation of a key argument fails, :func:`refusal` answers from a cache of the
module's handle-independent codes, keyed by (backend, call id, mechanism type). When
nothing is cached it raises :class:`Unresolved`, and the connection (on its slow path)
awaits :meth:`Unresolved.resolve`: the same call is made on the backend with
CK_INVALID_HANDLE (0) in place of every key argument not yet translated — a handle no
module can resolve — and an empty template. The client's own handle never reaches the
module. The module's answer is what the client gets if it does not name the handle
(CKR_KEY_HANDLE_INVALID and its kin give the gateway's code for the argument's role).
Only codes that depend on nothing but (call, mechanism) are cached.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend
from ..codec import Mechanism, ckr
from ..errors import BackendUnavailable, Pkcs11Error
from .tables import CAPACITY_ARGS, CREATE_TEMPLATES, MECHANISM_CALLS, OBJECT_ARGS

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .handles import Session

log = logging.getLogger("p11gate.conn")

#: the module's answers that name the handle: the gateway's role code is given instead
HANDLE_CODES = frozenset({
    ckr.OK, ckr.OBJECT_HANDLE_INVALID, ckr.KEY_HANDLE_INVALID,
    ckr.WRAPPING_KEY_HANDLE_INVALID, 0xF0,  # CKR_UNWRAPPING_KEY_HANDLE_INVALID
    ckr.ARGUMENTS_BAD, ckr.GENERAL_ERROR, ckr.DEVICE_ERROR, ckr.DEVICE_MEMORY,
    ckr.HOST_MEMORY, ckr.FUNCTION_FAILED,
})
#: answers that depend only on (backend, call id, mechanism type): cached
CACHED_CODES = frozenset({ckr.FUNCTION_NOT_SUPPORTED, ckr.MECHANISM_INVALID})

_Key = tuple[int, int]
_cache: weakref.WeakKeyDictionary[Backend, dict[_Key, int]] = weakref.WeakKeyDictionary()


def _key(call_id: int, bargs: list[Any]) -> _Key:
    mech = bargs[1] if call_id in MECHANISM_CALLS and len(bargs) > 1 else None
    return call_id, mech.type if isinstance(mech, Mechanism) else -1


def cached(backend: Backend, call_id: int, bargs: list[Any]) -> int | None:
    """The cached handle-independent answer of the module, or None."""
    per = _cache.get(backend)
    return None if per is None else per.get(_key(call_id, bargs))


class Unresolved(Pkcs11Error):
    """A key handle that does not translate, for a (call, mechanism) whose module answer
    is not known yet. Carries the role code (what a caller that does not resolve it
    answers, so ignoring this subclass is safe)."""

    def __init__(self, conn: ClientConnection, session: Session, call_id: int,
                 bargs: list[Any], pos: int, role_rv: int) -> None:
        super().__init__(role_rv, "unknown key handle")
        self.conn = conn
        self.session = session
        self.call_id = call_id
        self.bargs = bargs
        self.pos = pos
        self.role_rv = role_rv

    async def resolve(self) -> Pkcs11Error:
        """Probe the module once (see the module docstring); the error to answer."""
        backend = self.session.token.backend
        probe = self._probe_args()
        if isinstance(probe, Pkcs11Error):
            return probe
        try:
            await self.conn.gw.fair_share.submit(
                backend, self.conn.identity.key, self.call_id, probe, self.conn)
            rv = ckr.OK
        except (BackendUnavailable, TimeoutError):
            return Pkcs11Error(ckr.DEVICE_ERROR)
        except Pkcs11Error as e:
            rv = e.rv
        if rv == ckr.OK:
            # no module should accept CK_INVALID_HANDLE; if one does, its operation is
            # not the client's: the client gets the role code
            log.warning("module accepted CK_INVALID_HANDLE as a key",
                        extra={"conn": self.conn.id, "call_id": self.call_id,
                               "backend": backend.name})
        key = _key(self.call_id, probe)
        if rv in CACHED_CODES:
            _cache.setdefault(backend, {})[key] = rv
            return Pkcs11Error(rv, "module refuses the call whatever the handle")
        if rv in HANDLE_CODES:
            # not cached: whether the module looks at the handle before the session's
            # state (an active operation) can change from call to call
            return Pkcs11Error(self.role_rv)
        # session state (CKR_OPERATION_ACTIVE, CKR_OPERATION_NOT_INITIALIZED, …):
        # answered as the module gives it, not cached
        return Pkcs11Error(rv)

    def _probe_args(self) -> list[Any] | Pkcs11Error:
        c, call_id = self.conn, self.call_id
        token = self.session.token
        probe = list(self.bargs)
        for p in OBJECT_ARGS.get(call_id, ()):
            if p >= self.pos:
                probe[p] = 0  # CK_INVALID_HANDLE: never the client's handle
        try:
            if call_id in MECHANISM_CALLS:
                probe[1] = c._mechanism(probe[1], token)
        except Pkcs11Error as e:
            return e
        for p in CREATE_TEMPLATES.get(call_id, ()):
            probe[p] = []
        caps = CAPACITY_ARGS.get(call_id)
        if caps is not None:
            for p, _item in caps:
                probe[p] = 0
        return probe


def refusal(conn: ClientConnection, session: Session, call_id: int, bargs: list[Any],
            pos: int, role_rv: int) -> Pkcs11Error:
    """The error for a key argument at ``pos`` that does not translate: the module's
    cached handle-independent code, the role code, or :class:`Unresolved`."""
    backend = session.token.backend
    known = cached(backend, call_id, bargs)
    if known is not None:
        return Pkcs11Error(known, "module refuses the call whatever the handle")
    return Unresolved(conn, session, call_id, bargs, pos, role_rv)

"""Quotas (DESIGN decision 9): connections overall and per identity, a reserve of file
descriptors, sessions per connection and identity, session objects per connection and
token objects per identity; and the open-files limit raised at start.

A quota that is hit gives the PKCS#11 code for it (CKR_SESSION_COUNT,
CKR_DEVICE_MEMORY) or a connection closed at once, and a rate-limited log record.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..backends.soft.layered_backend import LayerView
from ..codec import ckr
from ..codec import constants as ck
from ..config import ServerConfig
from ..errors import Pkcs11Error
from .common import ID, attr_bool
from .limits import IdentityUsage, limited_log, log
from .shared_usage import SharedUsage
from .tables import CREATE_TEMPLATES, NEW_OBJECTS

if TYPE_CHECKING:
    from ..identity import Identity
    from ..policy.namespace import OwnershipStore
    from .connection import ClientConnection
    from .handles import ObjectRef
    from .token import VirtualToken

#: the copy keeps the original's CKA_TOKEN unless the template says otherwise
_COPY = ID["C_CopyObject"]


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open files limit",
                        extra={"soft": soft, "hard": hard, "error": str(e)})
    log.info("open files limit", extra={"nofile": soft, "hard": hard})
    return soft


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class GatewayLimits:
    """Connections, sessions and objects per identity; the file descriptor reserve."""

    def __init__(self, cfg: ServerConfig, ownership: OwnershipStore) -> None:
        self.cfg = cfg
        self.ownership = ownership
        self.by_identity: dict[str, IdentityUsage] = {}
        self._key_of: dict[int, str] = {}
        self.refused = 0
        #: sessions being opened per identity (not in a handle table yet)
        self._opening: Counter[str] = Counter()
        #: per connection id: session objects it made -> (token, session handle)
        self._session_objects: dict[int, dict[tuple[int, int, int],
                                              tuple[VirtualToken, int]]] = {}
        #: token objects made by identities whose namespace does not record ownership:
        #: (token, class, id, label) -> how many each identity made with it (several
        #: objects may share an identity there, and on a layered token every identity's
        #: token has the configured name); and the count per identity
        self._made: dict[tuple[str, int, bytes, bytes], Counter[str]] = {}
        self._made_by: Counter[str] = Counter()
        #: on a shared state store: the per-identity quotas counted across processes
        #: and nodes (shared_usage.py); None: this process is the whole deployment
        self.shared: SharedUsage | None = None

    def counts(self) -> dict[str, tuple[int, int]]:
        """Connections and sessions (open and being opened) per identity, here."""
        return {key: (len(u.connections), self._sessions_of(key, u.connections))
                for key, u in self.by_identity.items()}

    def _sessions_of(self, key: str, conns: set[ClientConnection] | None = None) -> int:
        if conns is None:
            usage = self.by_identity.get(key)
            conns = usage.connections if usage is not None else set()
        return self._opening[key] + sum(len(c.handles.sessions) for c in conns)

    # -- connections and file descriptors

    def admit(self, conn: ClientConnection, ident: Identity) -> bool:
        key = ident.key
        mine = self.by_identity.get(key)
        why = None
        if len(self._key_of) >= self.cfg.max_connections:
            why = "max_connections"
        elif mine is not None and len(mine.connections) >= \
                self.cfg.max_connections_per_identity:
            why = "max_connections_per_identity"
        elif self.fds_short():
            why = "fd_reserve"
        elif self.shared is not None and not self.shared.take(
                key, "connections", (len(mine.connections) if mine else 0,
                                     self._sessions_of(key)),
                self.cfg.max_connections_per_identity):
            why = "max_connections_per_identity"  # with the other processes' and nodes'
        if why is not None:
            self.refused += 1
            limited_log.warning("connection refused: limit reached", limit=why,
                                peer=ident.describe())
            return False
        if mine is None:
            mine = self.by_identity[key] = IdentityUsage()
        mine.connections.add(conn)
        conn.flow.usage = mine
        self._key_of[conn.id] = key
        return True

    def release(self, conn: ClientConnection) -> None:
        key = self._key_of.pop(conn.id, None)
        self._session_objects.pop(conn.id, None)
        if key is None:
            return
        conn.flow.release()
        mine = self.by_identity.get(key)
        if mine is not None:
            mine.connections.discard(conn)
            if not mine.connections:
                del self.by_identity[key]
        if self.shared is not None:
            self.shared.publish(key, (len(mine.connections) if mine else 0,
                                      self._sessions_of(key)))

    def fds_short(self, exact: bool = False) -> bool:
        """Fewer than fd_reserve descriptors free (counted only when it could be so;
        always with ``exact``: TLS handshakes under way hold descriptors that the
        connections admitted do not count)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return False
        if not exact and 2 * len(self._key_of) + 4 * self.cfg.fd_reserve < soft:
            return False  # far from it: spare the /proc read
        return soft - open_fds() < self.cfg.fd_reserve

    def can_accept(self, pending: int = 0) -> bool:
        """For listeners that accept sockets themselves (TLS, before the handshake):
        ``pending`` handshakes under way count as connections (a peer that never
        finishes one must not hold more than the limit)."""
        full = len(self._key_of) + pending >= self.cfg.max_connections
        if full or self.fds_short(exact=True):
            self.refused += 1
            limited_log.warning("connection refused: limit reached",
                                limit="max_connections" if full else "fd_reserve")
            return False
        return True

    # -- sessions

    @contextlib.contextmanager
    def opening_session(self, conn: ClientConnection) -> Iterator[None]:
        """Around C_OpenSession: CKR_SESSION_COUNT when the connection or its identity
        has its quota of sessions (counting opens under way)."""
        key = conn.identity.key
        usage = self.by_identity.get(key)
        conns = usage.connections if usage is not None else {conn}
        if len(conn.handles.sessions) >= self.cfg.max_sessions_per_connection:
            _prune_dead_sessions(conn)
            if len(conn.handles.sessions) >= self.cfg.max_sessions_per_connection:
                self._hit(conn, "max_sessions_per_connection", ckr.SESSION_COUNT)
        total = self._sessions_of(key, conns)
        if total >= self.cfg.max_sessions_per_identity:
            for c in conns:
                _prune_dead_sessions(c)
            total = self._sessions_of(key, conns)
            if total >= self.cfg.max_sessions_per_identity:
                self._hit(conn, "max_sessions_per_identity", ckr.SESSION_COUNT)
        if self.shared is not None and not self.shared.take(
                key, "sessions", (len(conns), total), self.cfg.max_sessions_per_identity):
            self._hit(conn, "max_sessions_per_identity", ckr.SESSION_COUNT)
        self._opening[key] += 1
        try:
            yield
        finally:
            self._opening[key] -= 1
            if not self._opening[key]:
                del self._opening[key]

    # -- objects

    def check_create(self, conn: ClientConnection, token: VirtualToken, call_id: int,
                     args: list[Any]) -> None:
        """Before a creating call: CKR_DEVICE_MEMORY when what it would make exceeds the
        connection's session-object or the identity's token-object quota. An object
        whose kind the template leaves open (a copy) counts against both."""
        on_token = [attr_bool(args[p], ck.CKA_TOKEN) for p in CREATE_TEMPLATES[call_id]]
        made = len(NEW_OBJECTS[call_id])
        if len(on_token) < made:  # one template for several objects
            on_token += [on_token[-1] if on_token else None] * (made - len(on_token))
        session_new = sum(1 for v in on_token if not v)
        token_new = sum(1 for v in on_token if v or (v is None and call_id == _COPY))
        if session_new:
            mine = self._session_objects.get(conn.id, {})
            if len(mine) + session_new > self.cfg.max_session_objects_per_connection:
                self._prune_session_objects(conn)
                if len(mine) + session_new > self.cfg.max_session_objects_per_connection:
                    self._hit(conn, "max_session_objects_per_connection", ckr.DEVICE_MEMORY)
        if token_new:
            key = conn.identity.key
            owned = self.ownership.count_owned_by(key) + self._made_by[key]
            if owned + token_new > self.cfg.max_token_objects_per_identity:
                self._hit(conn, "max_token_objects_per_identity", ckr.DEVICE_MEMORY)

    def created(self, conn: ClientConnection, session: int, ref: ObjectRef,
                info: tuple[bool, int, bytes, bytes]) -> None:
        """After a creation: remember what counts against which quota. A token object
        of an owned namespace is counted from the registry's ownership records."""
        t = ref.token
        ns = conn.grants[t].namespace
        claimed = ns is not None and ns.owned
        if not info[0]:
            self._session_objects.setdefault(conn.id, {})[
                (id(t), ref.generation, ref.backend_handle)] = (t, session)
        elif not claimed:
            # every object counts, also one whose identity another object has: counted
            # once per identity, a repeated (class, CKA_ID, CKA_LABEL) made any number
            key = conn.identity.key
            self._made.setdefault((t.name, *info[1:]), Counter())[key] += 1
            self._made_by[key] += 1

    def _uncount(self, conn: ClientConnection, token: VirtualToken,
                 obj: tuple[bool, int, bytes, bytes]) -> str | None:
        """Take one object with this identity off its maker's count: the caller's own
        when it made one, else any maker's (an administrator destroying a tenant's
        object), but never another identity's on a layered token: there each identity
        has a token of its own under the same name, and a copy-on-write copy (uncounted)
        may have the identity of an object someone else made. The maker, or None."""
        key = (token.name, *obj[1:])
        makers = self._made.get(key)
        if not makers:
            return None
        mine = makers[conn.identity.key] > 0
        if not mine and isinstance(token.backend, LayerView):
            return None
        who = conn.identity.key if mine else next(iter(makers))
        makers[who] -= 1
        if makers[who] <= 0:
            del makers[who]
        if not makers:
            del self._made[key]
        return who

    def renamed(self, conn: ClientConnection, token: VirtualToken,
                old: tuple[bool, int, bytes, bytes], new: tuple[bool, int, bytes, bytes]) -> None:
        """After a change of CKA_ID or CKA_LABEL: the count follows the object (else a
        rename then a new object with the old identity would go uncounted, and a
        destroy under the new one would never give the quota back)."""
        if not old[0]:
            return
        who = self._uncount(conn, token, old)
        if who is not None:
            self._made.setdefault((token.name, *new[1:]), Counter())[who] += 1

    def destroyed(self, conn: ClientConnection, ref: ObjectRef,
                  info: tuple[bool, int, bytes, bytes] | None) -> None:
        t = ref.token
        mine = self._session_objects.get(conn.id)
        if mine is not None:
            mine.pop((id(t), ref.generation, ref.backend_handle), None)
        if info is not None and info[0]:
            maker = self._uncount(conn, t, info)
            if maker is not None:
                self._made_by[maker] -= 1
                if self._made_by[maker] <= 0:
                    del self._made_by[maker]

    def finalized(self, conn: ClientConnection) -> None:
        """C_Finalize or close: the connection's sessions, hence its session objects,
        are gone."""
        self._session_objects.pop(conn.id, None)

    def _prune_session_objects(self, conn: ClientConnection) -> None:
        """Session objects die with the session that made them and with their backend
        instance: forget those (only when the quota is reached)."""
        mine = self._session_objects.get(conn.id)
        if not mine:
            return
        for k, (t, sh) in list(mine.items()):
            s = conn.handles.sessions.get(sh)
            if k[1] != t.backend.generation or s is None or s.generation != k[1]:
                del mine[k]

    def _hit(self, conn: ClientConnection, limit: str, rv: int) -> None:
        limited_log.warning("limit reached", limit=limit, peer=conn.peer,
                            value=getattr(self.cfg, limit), rv=ckr.name(rv))
        raise Pkcs11Error(rv, f"{limit} reached")




def _prune_dead_sessions(conn: ClientConnection) -> None:
    """Sessions of a backend instance that died are gone: drop them from the handle
    table (as session_for does when one is used) before counting."""
    sessions = conn.handles.sessions
    for h in [h for h, s in sessions.items() if s.generation != s.token.backend.generation]:
        del sessions[h]

"""Applying a new, already validated configuration to a running gateway.

``p11gate.reload`` loads and checks the file; this module changes the live objects:
policy, limits, PIN maps, the TLS context of new handshakes, and the set of back ends,
pools and tokens. Connections stay open. Everything here runs on the event loop
between two awaits at most per step, and calls that arrive meanwhile see either the
old or the new state of each table, never a half-built one: new objects are made and
started first, then swapped in.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend
from ..backends.factory import make_backend
from ..backends.pool.pool import PoolBackend
from ..config import Config, TokenConfig
from ..errors import Pkcs11Error
from ..policy import Policy
from ..remote.tls import server_context, watch_crl
from . import login_calls
from .common import ID
from .fair_share import FairShares
from .pins import MappedPins
from .tls_listener import TlsListener
from .token import VirtualToken

if TYPE_CHECKING:
    from ..gateway import Gateway
    from .connection import ClientConnection

log = logging.getLogger("p11gate.reload")

#: token settings a running token takes over in place; any other change makes it a new
#: token (its sessions end as for a removed one)
_IN_PLACE = {"pins", "max_pin_failures", "pin_lockout"}

def tls_context(gw: Gateway, cfg: Config) -> ssl.SSLContext | None:
    """The context for new TLS handshakes, built before anything changes (a bad
    certificate or key refuses the reload). None: the gateway has no TLS listener."""
    if not any(isinstance(s, TlsListener) for s in gw._servers):
        return None
    if cfg.tls is None:
        raise ValueError("[tls] removed while a tls: listener is running; restart to "
                         "remove the listener")
    return server_context(cfg.tls)

async def apply(gw: Gateway, cfg: Config, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    """Switch ``gw`` to ``cfg``; returns what changed (for the log and the reply)."""
    old = gw.cfg
    changes: dict[str, Any] = {}
    added_backends = await _add_backends(gw, cfg)
    added_pools = await _add_pools(gw, cfg)
    if added_backends or added_pools:
        changes["backends_added"] = added_backends + added_pools
        _new_shares(gw, cfg)
    gw.cfg = cfg
    gw.limits.cfg = cfg.server  # new connections and new sessions/objects
    if cfg.server.log_level != old.server.log_level:
        logging.getLogger("p11gate").setLevel(cfg.server.log_level.upper())
        changes["log_level"] = cfg.server.log_level
    if cfg.rule != old.rule:
        changes["rules"] = [r.name for r in cfg.rule]
    gw.policy = Policy(cfg.rule)
    removed, added, updated = await _swap_tokens(gw, cfg)
    for key, names in (("tokens_removed", removed), ("tokens_added", added),
                       ("tokens_updated", updated)):
        if names:
            changes[key] = names
    revoked = await _regrant(gw)
    if revoked:
        changes["grants_revoked"] = revoked
    stopped = await _drop_unused(gw, cfg)
    if stopped:
        changes["backends_removed"] = stopped
    if ctx is not None and cfg.tls is not None:
        for s in gw._servers:
            if isinstance(s, TlsListener):
                s.ctx = ctx  # the next handshake; established connections keep theirs
                watch_crl(s, ctx, cfg.tls, gw.crl_loaded)
        changes["tls"] = "new context for new handshakes"
    if cfg.server != old.server:
        changes["server"] = sorted(k for k in type(cfg.server).model_fields
                                   if getattr(cfg.server, k) != getattr(old.server, k))
    return changes

def _new_shares(gw: Gateway, cfg: Config) -> None:
    """A share book that knows the new back ends too (FairShares knows only those it
    was made with): the running back ends keep their share objects, with their queues
    and calls in flight; a new pool's share adds up its members' from the new book."""
    shares = FairShares(cfg, _served(gw))
    running = gw.fair_share._by_backend
    shares._by_backend.update({b: running[b] for b in shares._by_backend if b in running})
    gw.fair_share = shares

def _served(gw: Gateway) -> dict[str, Backend]:
    return {**gw.backends, **gw.pools}


async def _add_backends(gw: Gateway, cfg: Config) -> list[str]:
    added = []
    for bc in cfg.backend:
        if bc.name in gw.backends:
            continue
        b = make_backend(bc, gw.registry)
        b.on_restart = gw._reattach_hook(b)
        try:
            await b.start()
        except Pkcs11Error as e:  # as at start: it retries by itself
            log.error("backend failed to start", extra={"backend": b.name, "error": str(e)})
        gw.backends[bc.name] = b
        added.append(bc.name)
    return added

async def _add_pools(gw: Gateway, cfg: Config) -> list[str]:
    added = []
    for pc in cfg.pool:
        if pc.name in gw.pools:
            continue
        p = PoolBackend(pc, gw.backends, gw.registry)
        await p.start()
        gw.pools[pc.name] = p
        added.append(pc.name)
    return added

async def _swap_tokens(gw: Gateway, cfg: Config) -> tuple[list[str], list[str], list[str]]:
    running = {t.name: t for t in gw.tokens}
    served = _served(gw)
    keep: list[VirtualToken] = []
    removed: list[VirtualToken] = []
    added: list[str] = []
    updated: list[str] = []
    for tc in cfg.token:
        t = running.pop(tc.name, None)
        if t is not None and t.cfg == tc:
            keep.append(t)
            continue
        if t is not None and _only_in_place(t.cfg, tc):
            _update_in_place(gw, t, tc)
            keep.append(t)
            updated.append(tc.name)
            continue
        if t is not None:
            removed.append(t)  # changed backend, selection or PIN mode: a new token
        nt = VirtualToken(tc, served[tc.backend], gw.registry)
        if nt.backend.up:
            try:
                await nt.attach()
            except Pkcs11Error as e:  # visible (not present) and retried on first use
                log.error("token not attached", extra={"token": nt.name, "error": str(e)})
        keep.append(nt)
        added.append(tc.name)
    removed += running.values()
    # one swap: C_GetSlotList and slot lookups see the old list or the new one
    gw.tokens = keep
    gw.tokens_by_slot = {t.slot_id: t for t in keep}
    for t in removed:
        await _retire(gw, t)
    return [t.name for t in removed], added, updated

def _only_in_place(old: TokenConfig, new: TokenConfig) -> bool:
    diff = {k for k in type(new).model_fields if getattr(old, k) != getattr(new, k)}
    return diff <= _IN_PLACE

def _update_in_place(gw: Gateway, t: VirtualToken, tc: TokenConfig) -> None:
    t.cfg = tc
    # the throttle keeps its counts; only its bounds change
    t.throttle.max_failures = tc.max_pin_failures
    t.throttle.lockout = tc.pin_lockout
    if tc.pin_mode == "mapped":
        t.mapped_pins = MappedPins(tc.name, tc.pins, gw.registry)

async def _retire(gw: Gateway, t: VirtualToken) -> None:
    """A token gone from the configuration: every connection's sessions, handles and
    login on it end (their handles answer CKR_SESSION_HANDLE_INVALID and
    CKR_OBJECT_HANDLE_INVALID), then the gateway's own session."""
    for c in list(gw.connections):
        await drop_token(c, t)
    if t.control_session is not None and t.backend.up:
        try:
            await t.backend.call(ID["C_CloseSession"], [t.control_session])
        except Pkcs11Error:
            pass
        t.control_session = None
    t.attached_generation = -1

async def drop_token(c: ClientConnection, t: VirtualToken) -> None:
    """End ``c``'s use of ``t`` (a token removed, or a grant revoked)."""
    c.grants.pop(t, None)
    if t in c.logins:
        try:
            await login_calls.logout(c, t, closing=True)
        except Exception:
            log.exception("logout at reload failed", extra={"conn": c.id, "token": t.name})
    await c._close_sessions(t)
    for ref in list(c.handles.objects_of(t)):
        c.handles.objects.pop(ref.handle, None)

async def _regrant(gw: Gateway) -> list[str]:
    """Each connection's grants from the new rules; they decide its next call. A token
    it may no longer see loses its sessions and login."""
    names = [t.name for t in gw.tokens]
    revoked = []
    for c in list(gw.connections):
        if c.closed or c.transport is None:
            continue
        by_name = gw.policy.grants_for(c.identity, names)
        new = gw.layer_views.grants(c.identity, by_name)
        for t in [t for t in c.grants if t not in new]:
            revoked.append(f"{c.peer}:{t.name}")
            await drop_token(c, t)
        c.grants = new
    return revoked

async def _drop_unused(gw: Gateway, cfg: Config) -> list[str]:
    """Back ends and pools no longer in the file stop once no token uses them."""
    pools = {p.name for p in cfg.pool}
    backends = {b.name for b in cfg.backend}
    stopped = []
    for name in [n for n in gw.pools if n not in pools]:
        p = gw.pools.pop(name)
        await p.stop()
        stopped.append(name)
    for name in [n for n in gw.backends if n not in backends]:
        b = gw.backends.pop(name)
        await b.stop()
        stopped.append(name)
    return stopped

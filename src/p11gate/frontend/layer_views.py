"""Layered tokens in the frontend: each identity gets a virtual token of its own.

A token whose soft back end is layered is not one token for everybody: its objects
depend on who asks. So a connection's grants name, for such a token, a per-identity
:class:`VirtualToken` (same slot id, same configuration) served by the back end's view
for that identity's stack of layers; sessions, login and handles of different
identities never meet. Everything else in the frontend works unchanged on it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..backends.slots import pad
from ..backends.soft.layered_backend import LayeredSoftBackend, LayerView, MadeToken
from ..codec import Call, ckr
from ..config import TokenConfig, stable_slot_id
from ..errors import Pkcs11Error
from ..identity import Identity
from ..policy import Grant
from ..policy.config import RuleConfig
from ..policy.rules import identity_matches
from .token import VirtualToken

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .server import Gateway

log = logging.getLogger("p11gate.token")


def layer_stack(cfg: TokenConfig, rules: list[RuleConfig],
                ident: Identity) -> tuple[list[tuple[str, str]], bool]:
    """(layer name, access) top first, and whether the identity has a layer 0."""
    by_name = {r.name: r for r in rules}

    def matches(rule_name: str) -> bool:
        rule = by_name.get(rule_name)
        return rule is not None and identity_matches(rule, ident)

    stack: list[tuple[str, str]] = []
    for tl in cfg.layers:
        grant = next((g for g in tl.grant if matches(g.rule)), None)
        if grant is not None:
            stack.append((tl.layer, grant.access))
    own = any(r == "*" or matches(r) for r in cfg.own_layer)
    return stack, own


def made_label(label: bytes) -> str:
    """A made token's label from C_InitToken's: what fits CK_TOKEN_INFO.label (32
    bytes of UTF-8), cut between characters. Invalid bytes become U+FFFD, three bytes
    each: cut after decoding, else the label shown would end in half a character."""
    text = label.rstrip(b"\0 ").decode("utf-8", "replace")
    return text.encode()[:32].decode("utf-8", "ignore")


class LayerViews:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        #: key → (the configured token, this identity's token of it)
        self._tokens: dict[tuple[Any, ...], tuple[VirtualToken, VirtualToken]] = {}

    def token_for(self, t: VirtualToken, ident: Identity) -> VirtualToken:
        backend = t.backend
        if not isinstance(backend, LayeredSoftBackend) or not (
                t.cfg.layers or t.cfg.own_layer or t.cfg.client_tokens):
            return t
        stack: list[tuple[str, str]] = []
        own = False
        if not t.cfg.client_tokens:  # an offered token has no objects: none until made
            stack, own = layer_stack(t.cfg, self.gw.cfg.rule, ident)
        return self._view_token(t, backend, ident.key, stack, own)

    def _view_token(self, t: VirtualToken, backend: LayeredSoftBackend, who: str,
                    stack: list[tuple[str, str]], own: bool,
                    made: MadeToken | None = None) -> VirtualToken:
        key = (t.name, who, tuple(stack), own, made)
        cached = self._tokens.get(key)
        if cached is not None and cached[0] is t and cached[1].backend.generation == (
                backend.generation):
            v = cached[1]
        else:
            cfg = t.cfg
            if made is not None:
                cfg = t.cfg.model_copy(update={"name": f"{t.name}:{made.serial}",
                                               "slot_id": self._slot_id(t, who, made)})
            view = backend.view(who, stack, own, made.label if made else t.cfg.name,
                                made=made.serial if made else "",
                                offer=made is None and bool(t.cfg.client_tokens))
            view.generation = backend.generation
            v = VirtualToken(cfg, view, self.gw.registry)
            if made is not None:
                v.label = pad(made.label, 32)
            self._tokens[key] = (t, v)
        # what a reload changes in place on the configured token (PIN bounds, mapped
        # PINs) applies to every identity's token of it: they share it
        v.cfg, v.throttle, v.mapped_pins = t.cfg, t.throttle, t.mapped_pins
        if isinstance(v.backend, LayerView):
            # the quota counted in the gateway starts at 0 with every start; layer 0
            # counts what its file holds
            v.backend.own_limit = self.gw.cfg.server.max_token_objects_per_identity
        return v

    def _slot_id(self, t: VirtualToken, who: str, made: MadeToken) -> int:
        """Stable across restarts; never a configured token's slot."""
        seed = f"{t.name}\0{who}\0{made.serial}"
        slot = stable_slot_id(seed)
        while slot in self.gw.tokens_by_slot:
            seed += "\0"
            slot = stable_slot_id(seed)
        return slot

    def _made(self, t: VirtualToken, ident: Identity) -> list[VirtualToken]:
        backend = t.backend
        if not t.cfg.client_tokens or not isinstance(backend, LayeredSoftBackend):
            return []
        stack, _ = layer_stack(t.cfg, self.gw.cfg.rule, ident)
        return [self._view_token(t, backend, ident.key, stack, False, m)
                for m in backend.made_tokens(ident.key) if m.offer == t.name]

    def grants(self, ident: Identity, by_name: dict[str, Grant]) -> dict[VirtualToken, Grant]:
        """A connection's grants: per-identity tokens in place of layered ones, and
        after an offered token the tokens this identity made on it."""
        out: dict[VirtualToken, Grant] = {}
        for t in self.gw.tokens:
            if t.name in by_name:
                out[self.token_for(t, ident)] = by_name[t.name]
                out.update(dict.fromkeys(self._made(t, ident), by_name[t.name]))
        return out

    # ---------------------------------------------------------- tokens made by clients

    @staticmethod
    def offers(t: VirtualToken) -> bool:
        return isinstance(t.backend, LayerView) and t.backend.offer

    async def make_token(self, c: ClientConnection, t: VirtualToken, call: Call,
                         args: list[Any]) -> list[Any]:
        """C_InitToken on an offered token: a new token of the caller's, in a new slot
        only it sees. The PIN is not used (the identity is the credential)."""
        c.require(t, "create", "C_InitToken")
        label = args[2]
        if not isinstance(label, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "label")
        view = t.backend
        assert isinstance(view, LayerView)
        parent = view.parent
        who = c.identity.key
        c.gw.audit.attempt(call.name, c.peer, t.name)
        try:
            made = await parent.make_token(who, t.name, made_label(label),
                                           t.cfg.client_tokens)
        except OSError:
            c.gw.audit.record_best_effort(call.name, ckr.DEVICE_ERROR, c.peer, t.name)
            raise Pkcs11Error(ckr.DEVICE_ERROR, "token not made") from None
        except Pkcs11Error as e:
            c.gw.audit.record_best_effort(call.name, e.rv, c.peer, t.name)
            raise
        c.gw.audit.record_best_effort(call.name, ckr.OK, c.peer, t.name)
        base = next(x for x in self.gw.tokens if x.name == t.name)
        for conn in list(self.gw.connections):
            if conn.identity.key != who:
                continue
            grant = next((g for x, g in conn.grants.items() if x.name == t.name), None)
            if grant is not None:
                conn.grants.update(dict.fromkeys(self._made(base, conn.identity), grant))
        log.info("token made by a client", extra={"conn": c.id, "peer": c.peer,
                                                  "token": t.name, "serial": made.serial})
        return []

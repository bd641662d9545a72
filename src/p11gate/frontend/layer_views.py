"""Layered tokens in the frontend: each identity gets a virtual token of its own.

A token whose soft back end is layered is not one token for everybody: its objects
depend on who asks. So a connection's grants name, for such a token, a per-identity
:class:`VirtualToken` (same slot id, same configuration) served by the back end's view
for that identity's stack of layers; sessions, login and handles of different
identities never meet. Everything else in the frontend works unchanged on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backends.soft.layered_backend import LayeredSoftBackend
from ..config import TokenConfig
from ..identity import Identity
from ..policy import Grant
from ..policy.config import RuleConfig
from ..policy.rules import identity_matches
from .token import VirtualToken

if TYPE_CHECKING:
    from .server import Gateway


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


class LayerViews:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._tokens: dict[tuple[str, str, tuple[tuple[str, str], ...], bool],
                           VirtualToken] = {}

    def token_for(self, t: VirtualToken, ident: Identity) -> VirtualToken:
        backend = t.backend
        if not isinstance(backend, LayeredSoftBackend) or not (t.cfg.layers
                                                                or t.cfg.own_layer):
            return t
        stack, own = layer_stack(t.cfg, self.gw.cfg.rule, ident)
        key = (t.name, ident.key, tuple(stack), own)
        v = self._tokens.get(key)
        if v is None or v.cfg is not t.cfg or v.backend.generation != backend.generation:
            view = backend.view(ident.key, stack, own, t.cfg.name)
            view.generation = backend.generation
            v = self._tokens[key] = VirtualToken(t.cfg, view, self.gw.registry)
        return v

    def grants(self, ident: Identity, by_name: dict[str, Grant]) -> dict[VirtualToken, Grant]:
        """A connection's grants: per-identity tokens in place of layered ones."""
        return {self.token_for(t, ident): by_name[t.name]
                for t in self.gw.tokens if t.name in by_name}

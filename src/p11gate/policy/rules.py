"""From an identity to what it may do on each token.

Rules are tried in file order; for each token the first rule that matches the identity
and names the token decides. A token no rule grants is not seen at all (no slot). With
no rules configured, every identity that can reach a listener is an officer on every
token (access is then governed by the socket's permissions alone).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..codec import ckr
from ..errors import Pkcs11Error
from ..identity import Identity
from .config import ROLES, NamespaceConfig, RuleConfig
from .name_match import name_matches

ALL_PERMISSIONS = ROLES["officer"]

#: permissions that change the token; without all of them it reports CKF_WRITE_PROTECTED
WRITE_PERMISSIONS = frozenset({"create", "destroy", "modify"})


@dataclass(frozen=True)
class Namespace:
    owned: bool
    id_prefix: bytes | None
    label_prefix: bytes | None

    @classmethod
    def from_config(cls, c: NamespaceConfig) -> Namespace:
        return cls(
            owned=c.owned,
            id_prefix=bytes.fromhex(c.id_prefix) if c.id_prefix else None,
            label_prefix=c.label_prefix.encode() if c.label_prefix else None,
        )

    def prefix_match(self, cka_id: bytes, label: bytes) -> bool:
        return bool(
            (self.id_prefix is not None and cka_id.startswith(self.id_prefix))
            or (self.label_prefix is not None and label.startswith(self.label_prefix))
        )


@dataclass(frozen=True)
class Grant:
    """What one identity may do on one token, and which rule said so."""

    rule: str
    permissions: frozenset[str]
    namespace: Namespace | None = None

    @property
    def write_protected(self) -> bool:
        return not self.permissions & WRITE_PERMISSIONS

    def may(self, permission: str) -> bool:
        return permission in self.permissions


class Denied(Pkcs11Error):
    """A call refused by policy; carries the rule that decided, for logs and audit."""

    def __init__(self, rv: int, rule: str, what: str, token: str | None = None) -> None:
        super().__init__(rv, f"{what} denied by rule {rule!r}")
        self.rule = rule
        self.what = what
        self.token = token


#: the grant when no rules are configured
OPEN = Grant(rule="(no rules: open)", permissions=ALL_PERMISSIONS)


class Policy:
    def __init__(self, rules: Sequence[RuleConfig]) -> None:
        self.rules = list(rules)

    def grants_for(self, identity: Identity, tokens: Iterable[str]) -> dict[str, Grant]:
        """token name → grant, for the tokens this identity may see."""
        names = list(tokens)
        if not self.rules:
            return dict.fromkeys(names, OPEN)
        out: dict[str, Grant] = {}
        for rule in self.rules:
            if not _matches(rule, identity):
                continue
            ns = Namespace.from_config(rule.namespace) if rule.namespace else None
            for name in names:
                if name not in out and ("*" in rule.tokens or name in rule.tokens):
                    out[name] = Grant(rule.name, rule.permissions, ns)
        return out


def _matches(rule: RuleConfig, ident: Identity) -> bool:
    if rule.everyone:
        return True
    if ident.kind == "unix":
        return (ident.uid is not None and ident.uid in rule.uid) or (
            ident.gid is not None and ident.gid in rule.gid
        )
    if ident.kind == "tls":
        if not _from_ca(rule, ident):
            return False
        if not (rule.subject or rule.san):
            return bool(rule.issuer)  # an issuer-only rule: every client of those CAs
        if ident.subject is not None and any(
            name_matches(ident.subject, p) for p in rule.subject
        ):
            return True
        return any(fnmatch.fnmatchcase(s, p) for s in ident.sans for p in rule.san)
    return False


def identity_matches(rule: RuleConfig, ident: Identity) -> bool:
    """Whether ``rule``'s identity keys (uid, gid, subject, san, issuer, everyone) match
    ``ident``, whatever tokens it names (layer grants use the same match)."""
    return _matches(rule, ident)


def _from_ca(rule: RuleConfig, ident: Identity) -> bool:
    """The certificate is from a CA the rule names, or, when it names none, from the
    first CA of client_ca: a second CA cannot issue a first-CA tenant's subject."""
    if not rule.issuer:
        return ident.ca_index == 0
    return ident.issuer is not None and any(
        name_matches(ident.issuer, p) for p in rule.issuer)


def require(grant: Grant, permission: str, what: str, token: str | None = None) -> None:
    """Raise :class:`Denied` with the closest PKCS#11 code unless ``grant`` allows it:
    CKR_TOKEN_WRITE_PROTECTED for changes to a token this identity may not change at
    all, CKR_ACTION_PROHIBITED for anything else."""
    if grant.may(permission):
        return
    if permission in WRITE_PERMISSIONS and grant.write_protected:
        raise Denied(ckr.TOKEN_WRITE_PROTECTED, grant.rule, what, token)
    raise Denied(ckr.ACTION_PROHIBITED, grant.rule, what, token)

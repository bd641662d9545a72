"""The ``[[rule]]`` tables of the configuration.

A rule names who it applies to (any of: uids, gids, certificate subject patterns,
SAN patterns, or ``everyone``), which tokens it grants, and what the holder may do
there (a role, or an explicit list of permissions), optionally confined to a namespace.
A certificate's CA is part of who: ``issuer`` names the client CAs a rule's subject and
SAN patterns apply to; without it, they apply to certificates of the first CA in
``client_ca`` only.
"""

from __future__ import annotations

import re
from typing import Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Permission = Literal["use", "create", "destroy", "modify", "so"]

#: what each role may do
ROLES: dict[str, frozenset[str]] = {
    "readonly": frozenset({"use"}),
    "user": frozenset({"use", "create", "destroy", "modify"}),
    "officer": frozenset({"use", "create", "destroy", "modify", "so"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NamespaceConfig(_Strict):
    #: objects this identity created through the gateway (ownership kept in the registry)
    owned: bool = False
    #: objects whose CKA_ID starts with these bytes (hex, as pkcs11-tool --id takes them)
    id_prefix: str | None = None
    #: objects whose CKA_LABEL starts with this text
    label_prefix: str | None = None

    @field_validator("id_prefix")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                if not bytes.fromhex(v):
                    raise ValueError
            except ValueError:
                raise ValueError(f"{v!r}: give the CKA_ID prefix as hex digits, e.g. 'a1'") \
                    from None
        return v

    @model_validator(mode="after")
    def _something(self) -> NamespaceConfig:
        if not self.owned and self.id_prefix is None and not self.label_prefix:
            raise ValueError("a namespace needs owned = true, id_prefix or label_prefix")
        return self


class RuleConfig(_Strict):
    #: shown in logs and audit records when this rule decides
    name: str = Field(min_length=1)
    uid: list[int] = Field(default_factory=list)
    gid: list[int] = Field(default_factory=list)
    #: fnmatch patterns on the certificate subject (RFC 4514, e.g. "CN=app1,O=Example")
    subject: list[str] = Field(default_factory=list)
    #: fnmatch patterns on typed SANs, e.g. "DNS:*.team-a.example", "URI:spiffe://a/*"
    san: list[str] = Field(default_factory=list)
    #: the rule applies to every identity
    everyone: bool = False
    #: token names this rule grants ("*" = all)
    tokens: list[str] = Field(min_length=1)
    role: Literal["readonly", "user", "officer"] = "user"
    #: explicit permissions; replaces the role's when given
    allow: list[Permission] | None = None
    namespace: NamespaceConfig | None = None
    #: the client CAs (RFC 4514 subject of a CA in client_ca, exact or an fnmatch
    #: pattern) whose certificates this rule's subject/san apply to; alone, every
    #: certificate of those CAs. Without it: certificates of the first CA only
    issuer: list[str] = Field(default_factory=list)

    @field_validator("uid", "gid", "subject", "san", "tokens", "issuer", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, (str, int)) else v

    @field_validator("issuer")
    @classmethod
    def _issuer_names(cls, v: list[str]) -> list[str]:
        return [_issuer_name(p) for p in v]

    @model_validator(mode="after")
    def _selects_someone(self) -> RuleConfig:
        if not (self.uid or self.gid or self.subject or self.san or self.everyone
                or self.issuer):
            raise ValueError(
                f"rule {self.name!r} matches nobody: give uid, gid, subject, san, issuer "
                "or everyone = true"
            )
        return self

    @property
    def permissions(self) -> frozenset[str]:
        return frozenset(self.allow) if self.allow is not None else ROLES[self.role]


_GLOB = re.compile(r"[*?\[]")
_ATTRIBUTE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+)=")


def _issuer_name(value: str) -> str:
    """An ``issuer`` entry: an exact RFC 4514 name, written as the gateway writes
    certificate names (so "CN=A,O=B" and its spelling in the file compare equal), or an
    fnmatch pattern that starts with an attribute ("CN=Clients CA *")."""
    if _GLOB.search(value):
        if not _ATTRIBUTE.match(value):
            raise ValueError(f"issuer {value!r}: a pattern must start with an attribute, "
                             "e.g. 'CN=Clients CA A,*'")
        return value
    try:
        name = x509.Name.from_rfc4514_string(value)
    except ValueError:
        name = None
    if name is None or not len(name):
        raise ValueError(f"issuer {value!r}: not an RFC 4514 name; give the CA's subject "
                         "as `openssl x509 -noout -subject -nameopt RFC2253` prints it, "
                         "e.g. 'CN=Clients CA A,O=Example'")
    return name.rfc4514_string()

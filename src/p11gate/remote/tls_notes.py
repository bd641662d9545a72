"""What `p11gate check-config` says about the client CAs: each CA's index and id (the
id is part of the identity key of its clients, ``cert:<id>/<subject>``, except for the
first CA's, ``cert:<subject>``), and, with several CAs, which rules are confined to the
first because they name no issuer."""

from __future__ import annotations

from ..config import Config
from ..policy.name_match import name_matches
from . import pem
from .client_cas import ClientCAs


def client_ca_notes(cfg: Config) -> list[str]:
    assert cfg.tls is not None
    cas = ClientCAs(pem.certificates(cfg.tls.client_ca)).cas
    out = []
    for ca in cas:
        key = "cert:<subject>" if ca.index == 0 else f"cert:{ca.id}/<subject>"
        out.append(f"client CA #{ca.index}: {ca.subject} (id {ca.id}; identity keys {key})")
    for r in cfg.rule:
        if r.everyone or not (r.subject or r.san or r.issuer):
            continue
        if not r.issuer:
            if len(cas) > 1:
                out.append(f"rule {r.name!r}: names no issuer, so its subject/san patterns "
                           f"apply to certificates of CA #0 ({cas[0].subject}) only")
        elif not any(name_matches(ca.subject, p) for ca in cas for p in r.issuer):
            out.append(f"rule {r.name!r}: warning: its issuer matches no CA in client_ca "
                       "(the rule matches no certificate)")
    return out

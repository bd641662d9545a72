"""What `check-config` prints about a valid configuration: listeners, tokens (with the
PKCS#11 URI clients can name them by), pools and rules."""

from __future__ import annotations

from .config import Config
from .pkcs11_uri import format_token_uri, padded_text


def describe(cfg: Config) -> list[str]:
    lines = ["listeners:"]
    lines += [f"  {a}" for a in cfg.server.listen]
    if cfg.metrics.listen is not None:
        lines.append(f"metrics: {cfg.metrics.listen} (GET /metrics)")
    pools = {p.name for p in cfg.pool}
    lines.append("tokens:")
    for t in cfg.token:
        # the label is what the gateway answers for every token; manufacturer, model and
        # serial come from the backend token (`p11gate status` shows the full URI)
        uri = format_token_uri(padded_text(t.name.encode()[:32]))
        if t.backend in pools:
            where = f"pool {t.backend!r}"
        else:
            b = cfg.backend_named(t.backend)
            where = (f"backend {b.name!r} (soft token {b.path})" if b.type == "soft" else
                     f"backend {b.name!r} ({b.kmip.describe()})" if b.kmip is not None else
                     f"backend {b.name!r} ({b.module}, isolation={b.isolation})")
        lines.append(f"  token {t.name!r}: slot {t.virtual_slot_id:#x} on {where}, "
                     f"select {t.select.describe()}, pin_mode {t.pin_mode}")
        lines.append(f"    uri {uri}")
    if cfg.pool:
        lines.append("pools:")
        for p in cfg.pool:
            members = ", ".join(f"{m.backend} [{m.select.describe()}]" for m in p.members)
            lines.append(f"  pool {p.name!r} ({p.replication} replication): {members}")
    lines.append("rules:" if cfg.rule else "rules: none (every client may use every token)")
    for r in cfg.rule:
        who = [f"{k}={v}" for k, v in (("uid", r.uid), ("gid", r.gid), ("subject", r.subject),
                                       ("san", r.san), ("issuer", r.issuer)) if v]
        if r.everyone:
            who.append("everyone")
        what = f"allow {','.join(r.allow)}" if r.allow is not None else f"role {r.role}"
        lines.append(f"  rule {r.name!r}: {' '.join(who)} -> tokens {','.join(r.tokens)} "
                     f"({what})")
    return lines

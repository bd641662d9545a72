"""Configuration reload (SIGHUP, `systemctl reload`, `p11gate reload`).

The file is read and checked in full first — TOML and typed validation, the
cross-checks `check-config` makes, the new TLS certificate and key — and only a file
that passes replaces the running configuration (``frontend.reload.apply``). A file
that fails is refused with its reason logged; the old configuration stays in force in
every respect. Settings that belong to sockets and files opened at start (listeners,
state directory, admin socket, log format and file, audit, metrics endpoint) and a
changed definition of a running back end or pool need a restart: reload warns and
keeps their running values, and applies the rest.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from .audit import AuditError
from .codec import ckr
from .config import Config, ConfigError, load_config
from .config_checks import check
from .frontend.reload import apply, tls_context
from .gateway import Gateway

log = logging.getLogger("p11gate.reload")

#: [server] keys bound to what was opened at start
RESTART_SERVER_KEYS = ("listen", "state_dir", "admin_socket", "socket_mode", "uvloop",
                       "log_format", "log_file")
#: top-level sections bound to what was opened at start
RESTART_SECTIONS = ("audit", "metrics")


class Refused(Exception):
    """The new file is not used; the message says why (never a secret: config errors
    name keys, not values of PINs)."""


class Reloader:
    """Reloads ``path`` into ``gw``, one reload at a time."""

    def __init__(self, gw: Gateway, path: str | None) -> None:
        self.gw = gw
        self.path = path
        self._lock = asyncio.Lock()

    async def reload(self, requested_by: str = "SIGHUP") -> dict[str, Any]:
        """Reload, audited: a file that passes its checks is applied only once a
        ``PENDING`` record of the reload is written (a reload the audit log cannot show
        is not done: fail closed); the outcome follows as a record, and a refused file is
        recorded too where the log can take it. ``requested_by`` names who asked."""
        async with self._lock:  # SIGHUPs in a burst: one after the other, none lost
            audit = self.gw.audit
            try:
                cfg, warnings = self._load()
                ctx = self._tls(cfg)
                try:
                    audit.attempt("reload", requested_by, file=self.path)
                except AuditError as e:
                    raise Refused(f"not applied: {e}") from None
            except Refused as e:
                self.gw.reload_failures += 1
                log.error("configuration reload refused; the running configuration stays "
                          "in force", extra={"file": self.path, "reason": str(e)})
                audit.record_best_effort("reload", ckr.FUNCTION_FAILED, requested_by,
                                         file=self.path, reason=str(e))
                return {"ok": False, "error": str(e)}
            for w in warnings:
                log.warning(w)
            changes = await apply(self.gw, cfg, ctx)
            self.gw.reloads += 1
            log.info("configuration reloaded", extra={"file": self.path, "changes": changes})
            # applied: the PENDING record stands for it if this one cannot be written
            audit.record_best_effort("reload", ckr.OK, requested_by, file=self.path,
                                     changes=changes)
            return {"ok": True, "changes": changes, "warnings": warnings}

    def _load(self) -> tuple[Config, list[str]]:
        if self.path is None:
            raise Refused("demo mode has no configuration file to reload; serve --config")
        try:
            new = load_config(self.path)
        except ConfigError as e:
            raise Refused(str(e)) from None
        findings = check(new)
        if findings.errors:
            raise Refused("; ".join(findings.errors))
        new, warnings = keep_restart_only(self.gw.cfg, new)
        return new, findings.warnings + warnings

    def _tls(self, cfg: Config) -> ssl.SSLContext | None:
        try:
            return tls_context(self.gw, cfg)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise Refused(f"{cfg.source}: [tls]: {e}") from None


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of what only a restart changes, and one warning
    for each such change."""
    warnings = []
    server_keep = {}
    for key in RESTART_SERVER_KEYS:
        if getattr(new.server, key) != getattr(old.server, key):
            server_keep[key] = getattr(old.server, key)
            warnings.append(f"{new.source}: server.{key} changed: needs a restart; the "
                            "running value stays in force until then")
    update: dict[str, Any] = {}
    if server_keep:
        update["server"] = new.server.model_copy(update=server_keep)
    for section in RESTART_SECTIONS:
        if getattr(new, section) != getattr(old, section):
            update[section] = getattr(old, section)
            warnings.append(f"{new.source}: [{section}] changed: needs a restart; the "
                            "running settings stay in force until then")
    # a running back end or pool keeps its definition (its workers and sessions live on)
    for kind in ("backend", "pool"):
        running = {x.name: x for x in getattr(old, kind)}
        merged = []
        for x in getattr(new, kind):
            was = running.get(x.name)
            if was is not None and was != x:
                warnings.append(f"{new.source}: {kind} {x.name!r} changed: needs a restart "
                                "(or remove it, reload, add it back); it runs as before")
                x = was
            merged.append(x)
        update[kind] = merged
    return new.model_copy(update=update), warnings

"""Risky but valid configurations: said in one line each by `check-config` and `serve`.

A warning says what the setting allows and how to close it; an error (a PIN file others
can read) stops both commands. These checks look at the file system (modes of sockets'
directories and PIN files), so they run when the command runs, not when the file is
parsed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .admin import admin_socket_path
from .config import Config


@dataclass
class Findings:
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _unix_paths(cfg: Config) -> list[str]:
    import urllib.parse

    return [urllib.parse.unquote(a.removeprefix("unix:path="))
            for a in cfg.server.listen if a.startswith("unix:")]


def check(cfg: Config) -> Findings:
    out = Findings()
    src = cfg.source
    sockets = _unix_paths(cfg)
    if not cfg.rule:
        out.warnings.append(
            f"{src}: no [[rule]]: every client that can connect is a security officer on "
            "every token (use, create, destroy, C_InitPIN/C_SetPIN as SO); add [[rule]] "
            "tables granting each uid/gid/certificate only its tokens and role")
    for i, r in enumerate(cfg.rule):
        if r.everyone and "so" in r.permissions:
            out.warnings.append(
                f"{src}: rule[{i}] ({r.name}): everyone = true with security-officer rights: "
                f"any client that can connect is an officer on {', '.join(r.tokens)}; "
                "match uid/gid/subject instead, or give everyone role 'readonly' or 'user'")
    out.warnings += metrics_exposure(cfg)
    from .remote.pem import key_exposure  # (the TLS keys: the gateway's, the metrics')
    for what, key in (("tls.key", cfg.tls.key if cfg.tls else None),
                      ("metrics.tls_key", cfg.metrics.tls_key)):
        why = key_exposure(key) if key else None
        if why:
            out.warnings.append(f"{src}: {what}: {why}")
    mode = cfg.server.socket_mode
    if sockets and mode & 0o002:
        out.warnings.append(
            f"{src}: server.socket_mode = {mode:#o}: every local user can connect to "
            f"{', '.join(sockets)} (only [[rule]]s then decide); use 0o660 and put the "
            "clients' users in the socket's group")
    dirs = {os.path.dirname(p) or "." for p in sockets}
    dirs.add(os.path.dirname(admin_socket_path(cfg.server.state_dir, cfg.server.admin_socket)))
    for d in sorted(dirs):
        try:
            st = os.stat(d)
        except OSError:
            continue  # serve creates it (0755)
        m = stat.S_IMODE(st.st_mode)
        if m & 0o002:
            how = ("others can create files there while the gateway is down, so a client "
                   "may reach an impostor" if m & stat.S_ISVTX else
                   "any local user can replace the gateway's socket with their own and "
                   "collect clients' PINs")
            out.warnings.append(
                f"{src}: socket directory {d} is world-writable (mode {m:04o}): {how}; "
                "put the socket in a directory only the gateway's user can write "
                "(e.g. /run/p11gate, mode 0755)")
    for i, t in enumerate(cfg.token):
        if t.backend_pin_file is None:
            continue
        try:
            m = stat.S_IMODE(os.stat(t.backend_pin_file).st_mode)
        except OSError:
            continue  # the configuration already checked it exists
        if m & 0o077:
            out.errors.append(
                f"{src}: token[{i}] ({t.name}).backend_pin_file: {t.backend_pin_file} is "
                f"readable or writable by group/others (mode {m:04o}): anyone who reads it "
                f"logs into the backend; run `chmod 600 {t.backend_pin_file}`")
    for i, b in enumerate(cfg.backend):
        for key in ("init_so_pin_file", "init_user_pin_file", "key_file", "kmip.pin_file",
                    "kmip.password_file", "kmip.key"):
            f = getattr(b.kmip, key[5:], None) if key.startswith("kmip.") else getattr(b, key)
            if b.type not in ("soft", "kmip") or f is None:
                continue
            try:
                m = stat.S_IMODE(os.stat(f).st_mode)
            except OSError:
                continue  # read (and its absence reported) at the first start only
            if m & 0o077:
                out.errors.append(
                    f"{src}: backend[{i}] ({b.name}).{key}: {f} is readable or writable by "
                    f"group/others (mode {m:04o}): anyone who reads it has the token's "
                    f"credential; run `chmod 600 {f}`")
    return out


def metrics_exposure(cfg: Config) -> list[str]:
    """Metrics on a TCP address beyond loopback: plain HTTP anyone there can read (no
    secrets, but which tokens and functions are used, and how often)."""
    listen = cfg.metrics.listen
    if listen is None or listen.startswith("unix:") or cfg.metrics.tls_client_ca:
        return []  # (HTTPS with client certificates: only the CA's scrapers read it)
    import ipaddress

    from .metrics_config import parse_tcp

    host = parse_tcp(listen)[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return []
    except ValueError:
        if host == "localhost":
            return []
    kind = "HTTPS without client certificates" if cfg.metrics.tls_cert else "plain HTTP"
    return [f"{cfg.source}: metrics.listen = {listen!r}: {kind} that every host which "
            "can reach it may read (tokens, functions and call rates; no secrets); listen "
            "on 127.0.0.1 or a unix socket and let a local agent or proxy scrape it, or set "
            "tls_cert, tls_key and tls_client_ca"]

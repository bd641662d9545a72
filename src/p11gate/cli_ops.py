"""Commands for the operator on the host: `top` and `module-file` (and how `status`
finds the admin socket)."""

from __future__ import annotations

import sys

import click

from .config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/p11gate/p11gate.toml"


def admin_socket_for(config_path: str | None, socket_path: str | None,
                     state_dir: str | None) -> str:
    """The admin socket named by --socket, by a configuration file, or the demo's."""
    from .admin import admin_socket_path

    if socket_path is not None:
        return socket_path
    if config_path is not None:
        try:
            cfg = load_config(config_path)
        except ConfigError as e:
            click.echo(str(e), err=True)
            sys.exit(2)
        return admin_socket_path(cfg.server.state_dir, cfg.server.admin_socket)
    from .demo import default_state_dir

    return admin_socket_path(str(state_dir or default_state_dir()), None)


def admin_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--state-dir", default=None, help="state directory (demo mode)")(f)
    f = click.option("--socket", "socket_path", default=None, help="the admin socket path")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="the daemon's configuration file (to find its admin socket)")(f)
    return f


@click.command("top")
@admin_options
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="seconds between refreshes")
@click.option("--iterations", default=None, type=click.IntRange(1), hidden=True)
def top(config_path: str | None, socket_path: str | None, state_dir: str | None,
        interval: float, iterations: int | None) -> None:
    """A live view of calls/s, latency, errors and member health per token."""
    from .admin import query
    from .top import run

    path = admin_socket_for(config_path, socket_path, state_dir)
    try:
        run(lambda: query(path), interval, iterations)
    except KeyboardInterrupt:
        pass


@click.command("reload")
@admin_options
@click.option("--timeout", default=120.0, show_default=True,
              help="seconds to wait for the gateway's answer (new back ends start first)")
def reload_cmd(config_path: str | None, socket_path: str | None, state_dir: str | None,
               timeout: float) -> None:
    """Have the running gateway re-read its configuration file (as SIGHUP does), and
    wait for the result: exit 0 when the new file is in force, 1 with the reason when
    it was refused (the old configuration then stays in force)."""
    import json

    from .admin import query

    if socket_path is None and config_path is not None:
        socket_path = _admin_socket_of_any(config_path)
    path = admin_socket_for(config_path, socket_path, state_dir)
    try:
        reply = query(path, "reload", timeout=timeout)
    except OSError as e:
        click.echo(f"cannot reach the gateway at {path}: {e.strerror or e}", err=True)
        sys.exit(1)
    for w in reply.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not reply.get("ok"):
        click.echo(f"reload refused: {reply.get('error', reply)}", err=True)
        sys.exit(1)
    click.echo(f"configuration reloaded: {json.dumps(reply.get('changes', {}))}")


def _admin_socket_of_any(config_path: str) -> str:
    """The admin socket a file names even when the file is otherwise invalid: the
    gateway must be the one that refuses it (its log and counters say so). A file
    that is not TOML at all names none: its error is the answer (exit 1)."""
    import tomllib

    from .admin import admin_socket_path
    from .config import DEFAULT_STATE_DIR

    try:
        with open(config_path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        reason = str(e)
        try:
            load_config(config_path)
        except ConfigError as err:
            reason = str(err)  # the words check-config gives: file, line, fix
        click.echo(f"reload not asked: {reason}", err=True)
        sys.exit(1)
    section = raw.get("server")
    server: dict[str, object] = section if isinstance(section, dict) else {}
    state = server.get("state_dir", DEFAULT_STATE_DIR)
    configured = server.get("admin_socket")
    return admin_socket_path(str(state), configured if isinstance(configured, str) else None)


@click.command("module-file")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"the gateway's configuration (its unix listener) [{DEFAULT_CONFIG}]")
@click.option("--listen", default=None, help="the gateway's socket: unix:path=/abs")
@click.option("--tunnel", "gateways", multiple=True, metavar="tls:HOST:PORT",
              help="reach gateways over TLS with `p11gate tunnel` (repeat for failover)")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --tunnel: client certificate (else P11GATE_TLS_CERT at run time)")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --tunnel: client key (else P11GATE_TLS_KEY at run time)")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --tunnel: CA of the gateways (else P11GATE_TLS_CA at run time)")
@click.option("--install", is_flag=True,
              help="write the file (to /etc/pkcs11/modules/p11gate.module or --path)")
@click.option("--path", "target", default=None,
              help="where --install writes (a file, or a directory); implies --install")
def module_file(config_path: str | None, listen: str | None, gateways: tuple[str, ...],
                cert: str | None, key: str | None, ca: str | None, install: bool,
                target: str | None) -> None:
    """Print the p11-kit module file that shows the gateway's tokens to applications
    using p11-kit-proxy.so (Firefox, GnuTLS, p11tool)."""
    import os

    from . import module_file as mf

    try:
        if gateways:
            text = mf.tunnel_module_file(gateways, cert, key, ca)
        else:
            if listen is None:
                listen = _unix_listener(config_path or DEFAULT_CONFIG)
            text = mf.local_module_file(listen)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not (install or target):
        click.echo(text, nl=False)
        return
    try:
        written = mf.install(text, target or mf.SYSTEM_MODULE_FILE)
    except OSError as e:
        click.echo(f"cannot write {target or mf.SYSTEM_MODULE_FILE}: {e.strerror or e}",
                   err=True)
        sys.exit(1)
    click.echo(f"wrote {os.path.abspath(written)}")


def _unix_listener(config_path: str) -> str:
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    unix = [a for a in cfg.server.listen if a.startswith("unix:")]
    if not unix:
        raise click.UsageError(f"{config_path} has no unix listener; use --listen or "
                               "--tunnel")
    return unix[0]

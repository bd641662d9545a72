"""Command line: `p11gate serve`, `check-config`, `worker`, `bench`, `slots`."""

from __future__ import annotations

import os
import sys

import click

from .cli_migrate import migrate
from .cli_ops import admin_options, admin_socket_for, module_file, reload_cmd, top
from .config import ConfigError, load_config


@click.group()
@click.version_option(package_name="p11gate")
def main() -> None:
    """p11gate: a PKCS#11 gateway for stock p11-kit clients."""


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--config", "config_opt", default=None, type=click.Path(dir_okay=False),
              help="the file (same as PATH)")
@click.option("--no-load", is_flag=True,
              help="do not load the modules (each is loaded in a throw-away worker)")
def check_config(path: str | None, config_opt: str | None, no_load: bool) -> None:
    """Validate a configuration file (PATH, default /etc/p11gate/p11gate.toml) and print
    what it declares: listeners, tokens with their PKCS#11 URIs, pools and rules; load
    each module in a throw-away worker process and print what it says it is."""
    from .cli_ops import DEFAULT_CONFIG
    from .config_report import describe

    config_path = path or config_opt or DEFAULT_CONFIG
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    for line in describe(cfg):
        click.echo(line)
    if cfg.tls is not None:
        from .remote.tls_notes import client_ca_notes

        for line in client_ca_notes(cfg):
            click.echo(line)
    from .config_checks import check

    findings = check(cfg)
    if not no_load:
        from .module_probe import report

        loaded, load_errors = report(cfg.backend, config_path)
        for line in loaded:
            click.echo(line)
        findings.errors += load_errors
    for w in findings.warnings:
        click.echo(f"warning: {w}", err=True)
    if findings.errors:
        for err in findings.errors:
            click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if os.path.isdir(cfg.server.state_dir):
        from .registry import check_registry

        problem = check_registry(cfg.server.state_dir)  # read-only: a gateway may be running
        if problem is not None:
            click.echo(f"{config_path}: {problem}", err=True)
            sys.exit(2)
    warned = f" ({len(findings.warnings)} warnings)" if findings.warnings else ""
    click.echo(f"{config_path}: OK{warned}")


@main.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="configuration file (TOML); without it, a demo soft token is served")
@click.option("--state-dir", default=None, help="state directory (demo mode)")
@click.option("--listen", default=None, help="override the listen address (unix:path=/abs)")
def serve(config_path: str | None, state_dir: str | None, listen: str | None) -> None:
    """Run the gateway."""
    from .daemon import run

    sys.exit(run(config_path, state_dir=state_dir, listen=listen))


@main.command("status")
@admin_options
@click.option("--json", "as_json", is_flag=True, help="the full status as JSON")
def status(config_path: str | None, socket_path: str | None, state_dir: str | None,
           as_json: bool) -> None:
    """Show what a running gateway is doing: tokens, backends, pools, connections."""
    import json

    from .admin import query
    from .status_view import render

    socket_path = admin_socket_for(config_path, socket_path, state_dir)
    try:
        reply = query(socket_path)
    except OSError as e:
        click.echo(f"cannot reach the gateway at {socket_path}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(reply, indent=2) if as_json else render(reply), nl=as_json)


@main.command("hash-pin")
@click.option("--pin-stdin", is_flag=True,
              help="read the PIN from the first line of stdin instead of prompting")
def hash_pin_cmd(pin_stdin: bool) -> None:
    """Make a PIN hash for a `mapped` token's `pins` table (scrypt, salted)."""
    from .frontend.pins import hash_pin

    if pin_stdin:
        pin = sys.stdin.readline().rstrip("\r\n")
    else:
        pin = click.prompt("PIN", hide_input=True, confirmation_prompt=True)
    if not pin:
        click.echo("an empty PIN cannot be mapped", err=True)
        sys.exit(2)
    click.echo(hash_pin(pin.encode()))


def _tls_client_options(f):  # type: ignore[no-untyped-def]
    """--cert/--key/--ca, also from P11GATE_TLS_CERT/KEY/CA (short module lines)."""
    f = click.option("--ca", envvar="P11GATE_TLS_CA", required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate(s) the gateway's certificate must chain to")(f)
    f = click.option("--key", envvar="P11GATE_TLS_KEY", required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="this client's private key (PEM)")(f)
    f = click.option("--cert", envvar="P11GATE_TLS_CERT", required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="this client's certificate (PEM)")(f)
    return f


@main.command("tunnel")
@_tls_client_options
@click.option("--timeout", default=5.0, show_default=True, help="connect timeout per gateway")
@click.argument("gateways", nargs=-1, required=True, envvar="P11GATE_GATEWAYS")
def tunnel(cert: str, key: str, ca: str, timeout: float, gateways: tuple[str, ...]) -> None:
    """Carry one client's RPC stream (stdin/stdout) to a gateway over TLS.

    GATEWAYS are tls:HOST:PORT addresses, tried in order (or P11GATE_GATEWAYS, separated
    by spaces). Use it as P11_KIT_SERVER_ADDRESS="|p11gate tunnel … tls:gw:8443".
    """
    import asyncio

    from . import logs
    from .remote.tls import parse_tls_address
    from .remote.tunnel import run_tunnel

    logs.setup("warning", "text")  # the application's stderr: problems only, one line each
    # p11-kit makes an empty word of each extra space in `|p11gate tunnel  …`
    gateways = tuple(g for g in gateways if g)
    if not gateways:
        raise click.UsageError("give at least one gateway (tls:HOST:PORT)")
    for g in gateways:
        try:
            parse_tls_address(g)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    sys.exit(asyncio.run(run_tunnel(list(gateways), cert, key, ca, timeout)))


@main.command("agent")
@_tls_client_options
@click.option("--listen", required=True, help="local socket: unix:path=/absolute/path")
@click.option("--socket-mode", default="0600", show_default=True,
              help="permissions of the local socket (octal)")
@click.option("--timeout", default=3.0, show_default=True, help="connect timeout per gateway")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="keep applications' sessions through a gateway's death (else relay bytes)")
@click.option("--check-interval", default=2.0, show_default=True,
              help="seconds between health checks of gateways on back-off")
@click.argument("gateways", nargs=-1, required=True, envvar="P11GATE_GATEWAYS")
def agent(cert: str, key: str, ca: str, listen: str, socket_mode: str, timeout: float,
          resume: bool, check_interval: float, gateways: tuple[str, ...]) -> None:
    """Serve local applications on a unix socket, relayed over TLS to the healthy
    GATEWAYS (tls:HOST:PORT …, or P11GATE_GATEWAYS separated by spaces), spread by
    fewest connections; with --resume an application rides through a gateway's death."""
    import asyncio
    import logging

    from . import logs
    from .remote.agent import Agent, run_agent
    from .remote.tls import parse_tls_address

    for g in gateways:
        try:
            parse_tls_address(g)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    logs.setup("info", "json")
    logging.getLogger("p11gate").info("agent starting", extra={"gateways": list(gateways)})
    try:
        a = Agent(listen, list(gateways), cert, key, ca, timeout, int(socket_mode, 8),
                  resume, check_interval)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    sys.exit(asyncio.run(run_agent(a)))


@main.command("worker", hidden=True)
@click.argument("module")
@click.option("--threads", default=4, show_default=True)
@click.option("--init-reserved", default=None)
@click.option("--raw-parameter-mechanism", "raw_mechs", multiple=True,
              help="a vendor mechanism (0x8…) whose raw parameter bytes may reach the module")
def worker(
    module: str, threads: int, init_reserved: str | None, raw_mechs: tuple[str, ...]
) -> None:
    """Serve one PKCS#11 module over p11-kit RPC on stdin/stdout (started by the gateway)."""
    from .codec.param_kinds import check_vendor_list
    from .worker import main as worker_main

    try:
        raw = check_vendor_list([int(v, 0) for v in raw_mechs])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--raw-parameter-mechanism") from None
    sys.exit(worker_main(module, threads=threads, init_reserved=init_reserved,
                         raw_parameter_mechanisms=raw))


main.add_command(top)
main.add_command(reload_cmd)
main.add_command(module_file)
main.add_command(migrate)


def _register_optional() -> None:
    try:
        from .bench.cli import bench
        from .bench.pool import bench_pool
    except ImportError:
        return
    main.add_command(bench)
    main.add_command(bench_pool)


_register_optional()

if __name__ == "__main__":
    main()

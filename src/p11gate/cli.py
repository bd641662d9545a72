"""Command line: `p11gate serve`, `check-config`, `worker`, `bench`, `slots`."""

from __future__ import annotations

import sys

import click

from .config import ConfigError, load_config


@click.group()
@click.version_option(package_name="p11gate")
def main() -> None:
    """p11gate: a PKCS#11 gateway for stock p11-kit clients."""


@main.command("check-config")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a configuration file and print what it declares."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    for t in cfg.token:
        b = cfg.backend_named(t.backend)
        click.echo(
            f"token {t.name!r}: slot {t.virtual_slot_id:#x} on backend {b.name!r} "
            f"({b.module}, isolation={b.isolation})"
        )
    click.echo(f"{config_path}: OK")


@main.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="configuration file (TOML); without it, a demo SoftHSM token is served")
@click.option("--state-dir", default=None, help="state directory (demo mode)")
@click.option("--listen", default=None, help="override the listen address (unix:path=/abs)")
def serve(config_path: str | None, state_dir: str | None, listen: str | None) -> None:
    """Run the gateway."""
    from .daemon import run

    sys.exit(run(config_path, state_dir=state_dir, listen=listen))


@main.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="the daemon's configuration file (to find its admin socket)")
@click.option("--socket", "socket_path", default=None, help="the admin socket path")
@click.option("--state-dir", default=None, help="state directory (demo mode)")
def status(config_path: str | None, socket_path: str | None, state_dir: str | None) -> None:
    """Show what a running gateway is doing: tokens, backends, pools, connections."""
    import json

    from .admin import admin_socket_path, query

    if socket_path is None:
        if config_path is not None:
            try:
                cfg = load_config(config_path)
            except ConfigError as e:
                click.echo(str(e), err=True)
                sys.exit(2)
            socket_path = admin_socket_path(cfg.server.state_dir, cfg.server.admin_socket)
        else:
            from .demo import default_state_dir

            socket_path = admin_socket_path(str(state_dir or default_state_dir()), None)
    try:
        reply = query(socket_path)
    except OSError as e:
        click.echo(f"cannot reach the gateway at {socket_path}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(reply, indent=2))


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


@main.command("worker", hidden=True)
@click.argument("module")
@click.option("--threads", default=4, show_default=True)
@click.option("--init-reserved", default=None)
def worker(module: str, threads: int, init_reserved: str | None) -> None:
    """Serve one PKCS#11 module over p11-kit RPC on stdin/stdout (started by the gateway)."""
    from .worker import main as worker_main

    sys.exit(worker_main(module, threads=threads, init_reserved=init_reserved))


def _register_optional() -> None:
    try:
        from .bench.cli import bench
    except ImportError:
        return
    main.add_command(bench)


_register_optional()

if __name__ == "__main__":
    main()

"""`p11gate migrate`: bring the state store's schema up to date (also done at start
unless ``[state] migrate_at_start = false``)."""

from __future__ import annotations

import sys

import click

from .config import ConfigError, load_config


@click.command("migrate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="configuration file (default /etc/p11gate/p11gate.toml)")
@click.option("--status", "only_status", is_flag=True,
              help="print the schema version only, change nothing")
def migrate(config_path: str | None, only_status: bool) -> None:
    """Apply the state store's schema migrations (SQLite or PostgreSQL, per [state])."""
    from .cli_ops import DEFAULT_CONFIG
    from .state import StoreError, StoreUnusable, open_engine
    from .state.migrate import applied_versions, apply_migrations, latest_version

    path = config_path or DEFAULT_CONFIG
    try:
        cfg = load_config(path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    try:
        store = open_engine(cfg.state, cfg.server.state_dir, migrate=False)
        try:
            done = [] if only_status else apply_migrations(store)
            have = max(applied_versions(store), default=0)
        finally:
            store.close()
    except (StoreUnusable, StoreError) as e:
        click.echo(f"{path}: {e}", err=True)
        sys.exit(2)
    latest = latest_version(store.engine)
    note = (f"applied {', '.join(map(str, done))}" if done
            else "up to date" if have >= latest else f"{latest} available: run p11gate migrate")
    click.echo(f"{store.where}: schema version {have} ({note})")
    if only_status and have < latest:
        sys.exit(1)

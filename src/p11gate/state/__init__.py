"""The state store: one interface (:class:`StateStore`), two engines (SQLite, the
single-host default; PostgreSQL for several nodes), versioned migrations."""

from __future__ import annotations

import os

from .base import StateStore, StoreError, StoreUnusable, Transaction
from .config import StateConfig

__all__ = ["StateConfig", "StateStore", "StoreError", "StoreUnusable", "Transaction",
           "open_engine", "open_store"]


def open_engine(cfg: StateConfig, state_dir: str | os.PathLike[str], *,
                migrate: bool) -> StateStore:
    """The configured engine, opened; its schema migrated only if ``migrate``."""
    if cfg.engine == "postgresql":
        from .postgres import PostgresStore

        return PostgresStore(cfg, migrate=migrate)
    from .sqlite import Registry

    if cfg.path:
        return Registry(os.path.dirname(cfg.path), migrate=migrate,
                        file_name=os.path.basename(cfg.path))
    return Registry(state_dir, migrate=migrate)


def open_store(cfg: StateConfig, state_dir: str | os.PathLike[str], *,
               migrate: bool | None = None) -> StateStore:
    """Open the configured store and (unless ``migrate`` is false, or the configuration
    says so) bring its schema up to date. Raises StoreUnusable with a one-line message.
    Without migration, a schema older than this release is refused."""
    run = cfg.migrate_at_start if migrate is None else migrate
    store = open_engine(cfg, state_dir, migrate=run)
    if not run:
        from .migrate import applied_versions, latest_version

        have = max(applied_versions(store), default=0)
        if have < latest_version(store.engine):
            store.close()
            raise StoreUnusable(f"state store {store.where}: schema version {have}, this "
                                f"release needs {latest_version(store.engine)}; run "
                                "`p11gate migrate`")
    return store

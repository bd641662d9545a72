"""The registry: the name the components use for the state store's SQLite engine (see
:mod:`p11gate.state`), kept so existing imports and state files work unchanged."""

from .state.sqlite import FILE_NAME, Registry, RegistryError, RegistryUnusable, check_registry

__all__ = ["FILE_NAME", "Registry", "RegistryError", "RegistryUnusable", "check_registry"]

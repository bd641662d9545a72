"""Make the back end a ``[[backend]]`` section describes, by its ``type``.

One maker per type: adding a type (``"kmip"``, say) is one function and one entry in
``MAKERS``. Makers import their back end lazily, so a type's dependencies load only when
a configuration uses it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import BackendConfig
from ..state.base import StateStore
from .base import Backend


def _module(cfg: BackendConfig, store: StateStore) -> Backend:
    """A PKCS#11 module: in this process (isolation = "none") or in a worker process."""
    if cfg.isolation == "none":
        from .inprocess import InProcessBackend

        return InProcessBackend(
            cfg.name, cfg.module, threads=cfg.threads, call_timeout=cfg.call_timeout,
            init_reserved=cfg.init_reserved, env=cfg.env, keygen_timeout=cfg.keygen_timeout,
            raw_parameter_mechanisms=cfg.raw_parameter_mechanisms, executor=cfg.executor,
        )
    from .worker_process import WorkerBackend

    return WorkerBackend(cfg)


def _soft(cfg: BackendConfig, store: StateStore) -> Backend:
    """The built-in token; a stack of layers when the section names layers."""
    if cfg.layered:
        from .soft.layered_backend import LayeredSoftBackend

        return LayeredSoftBackend(cfg)
    from .soft.backend import SoftBackend

    return SoftBackend(cfg)


def _kmip(cfg: BackendConfig, store: StateStore) -> Backend:
    """A KMIP server; its identity map lives in the gateway's state store."""
    from .kmip.backend import KmipBackend

    return KmipBackend(cfg, store)


#: ``BackendConfig.type`` → the function that makes its back end
MAKERS: dict[str, Callable[[BackendConfig, StateStore], Backend]] = {
    "module": _module,
    "soft": _soft,
    "kmip": _kmip,
}


def make_backend(cfg: BackendConfig, store: StateStore) -> Backend:
    """``store``: the gateway's state store, for back ends that keep state in it."""
    return MAKERS[cfg.type](cfg, store)

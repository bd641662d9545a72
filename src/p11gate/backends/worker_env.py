"""The environment a worker process starts with.

A worker (``p11gate worker``, or an operator's ``worker_command`` such as a vendor's own
RPC server) gets a small fixed set of the gateway's variables -- what a program needs to
run: the search path, home, locale, time zone, temporary directory, and what locates the
Python installation -- plus the backend's configured ``env``. Nothing else of the
gateway's environment is passed on: in particular not the variable a token's
``backend_pin_env`` names (the configuration refuses a ``backend_pin_env`` among these
names, and a backend ``env`` that sets one), nor any other secret the gateway was
started with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: the gateway's variables a worker inherits (when set)
INHERITED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LANGUAGE",
    "LC_ALL", "LC_CTYPE", "LC_COLLATE", "LC_MESSAGES", "LC_MONETARY", "LC_NUMERIC",
    "LC_TIME", "LC_ADDRESS", "LC_IDENTIFICATION", "LC_MEASUREMENT", "LC_NAME",
    "LC_PAPER", "LC_TELEPHONE",
    # how `python -m p11gate.cli worker` finds p11gate when the gateway runs from a
    # virtual environment or a source tree
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
})


def worker_environment(extra: Mapping[str, str],
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: the inherited names from ``base`` (default: this
    process's environment), then the backend's ``extra`` (which wins)."""
    src = os.environ if base is None else base
    env = {k: v for k, v in src.items() if k in INHERITED}
    env.update(extra)
    return env

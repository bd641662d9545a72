"""Built-in soft tokens for tests, the counterpart of ``tests/softhsm.py``.

``make_soft_token(tmpdir)`` makes an initialised soft token file under ``tmpdir`` with
(by default) the same two key pairs ``make_token`` puts in a SoftHSM token:

* EC P-256, CKA_ID ``01``, CKA_LABEL ``"ec1"``
* RSA-2048, CKA_ID ``02``, CKA_LABEL ``"rsa1"``

It returns a dict like ``make_token``'s, with ``"type": "soft"`` and the file's
``"path"`` instead of a module; ``tests.gateway_proc.write_config`` takes either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from p11gate.backends.soft.provision import KeySpec, provision_sync

KEYS = (KeySpec("P-256", b"\x01", "ec1"), KeySpec("rsa:2048", b"\x02", "rsa1"))


def make_soft_token(tmpdir: str | os.PathLike[str], label: str = "anchor", pin: str = "1234",
                    so_pin: str = "5678", keys: bool = True) -> dict[str, Any]:
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{label}.db"
    provision_sync(str(path), label, so_pin.encode(), pin.encode(), KEYS if keys else ())
    return {"type": "soft", "path": str(path), "label": label, "pin": pin,
            "so_pin": so_pin, "module": None, "env": dict(os.environ)}

"""`p11gate worker` around a PKCS#11 module that records every object/key handle the
gateway passes to the module, for the error-precedence test. Run as a backend's
``worker_command``: ``recording_module.py RECORD_FILE MODULE``.

Each call with handle arguments (the positions the frontend translates) appends one
line ``<call id> <session> <handle> <handle> …`` to RECORD_FILE.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from p11gate.backends.native import NativeModule
from p11gate.frontend.tables import OBJECT_ARGS


def main() -> int:
    if len(sys.argv) != 3:
        raise SystemExit("usage: recording_module.py RECORD_FILE MODULE")
    record = open(sys.argv[1], "a", buffering=1)  # open for the worker's lifetime
    lock = threading.Lock()
    real_call = NativeModule.call

    def call(self: NativeModule, call_id: int, args: list[Any]) -> list[Any]:
        positions = OBJECT_ARGS.get(call_id)
        if positions:
            handles = " ".join(str(args[p]) for p in positions if p < len(args))
            with lock:
                record.write(f"{call_id} {args[0]} {handles}\n")
        return real_call(self, call_id, args)

    NativeModule.call = call  # type: ignore[method-assign]
    from p11gate.worker import main as worker_main

    return worker_main(sys.argv[2], threads=2)


if __name__ == "__main__":
    sys.exit(main())

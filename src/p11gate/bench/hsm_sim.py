"""A stand-in for an HSM's capacity, for pool benchmarks: `p11gate worker` around a real
module (SoftHSMv2), but serving one call at a time and spending a fixed service time on
each signature, as a small HSM partition would.

Used as a backend's ``worker_command``::

    worker_command = ["python", "-m", "p11gate.bench.hsm_sim", "--service-ms", "5",
                      "/usr/lib/softhsm/libsofthsm2.so"]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from ..backends.native import NativeModule
from ..codec.calls import CallId

#: calls that cost the simulated service time (the private-key operations)
SLOW = frozenset(CallId[n] for n in (
    "C_Sign", "C_SignFinal", "C_Decrypt", "C_DecryptFinal", "C_SignRecover"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="p11gate.bench.hsm_sim")
    p.add_argument("module")
    p.add_argument("--service-ms", type=float, default=5.0)
    a = p.parse_args(argv)
    service = a.service_ms / 1000.0
    one_at_a_time = threading.Lock()
    real_call = NativeModule.call

    def call(self: NativeModule, call_id: int, args: list[Any]) -> list[Any]:
        with one_at_a_time:
            if call_id in SLOW:
                time.sleep(service)
            return real_call(self, call_id, args)

    NativeModule.call = call  # type: ignore[method-assign,assignment]
    from ..worker import main as worker_main

    return worker_main(a.module, threads=4)


if __name__ == "__main__":
    sys.exit(main())

"""One client process of the node-death test: signs through the stock p11-kit-client.so
(P11_KIT_SERVER_ADDRESS points at the agent) until the stop file appears, ECDSA and RSA,
single- and multi-part, and writes one JSON line per call: start time, latency, kind,
the data and the signature (or the error).

    python -m tests.remote.node_death_client MODULE TOKEN_LABEL PIN STOP_FILE OUT_FILE
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass


def main() -> int:
    module, label, pin, stop, out_path = sys.argv[1:6]
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    with open(out_path, "w") as out, token.open(user_pin=pin) as session:
        ec = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, id=b"\x01")
        rsa = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, id=b"\x02")
        i = 0
        while not os.path.exists(stop):
            data = os.urandom(200)
            kind = ("ecdsa", "rsa", "rsa-multi")[i % 3]
            i += 1
            t0 = time.time()
            try:
                if kind == "ecdsa":
                    sig = ec.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
                elif kind == "rsa":
                    sig = rsa.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
                else:
                    parts = iter([data[:50], data[50:120], data[120:]])
                    sig = rsa.sign(parts, mechanism=Mechanism.SHA256_RSA_PKCS)
                rec = {"t": t0, "ms": (time.time() - t0) * 1000, "kind": kind,
                       "data": data.hex(), "sig": sig.hex()}
            except Exception as e:  # recorded: the test counts failed calls
                rec = {"t": t0, "ms": (time.time() - t0) * 1000, "kind": kind,
                       "error": f"{e.__class__.__name__}: {e}"}
            out.write(json.dumps(rec) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

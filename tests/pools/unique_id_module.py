"""`p11gate worker` around SoftHSMv2 as a module that has CKA_UNIQUE_ID (SoftHSM 2.6 does
not), for the pool's unique-id identity test. Run as a backend's ``worker_command``.

It stands in for a vendor cluster whose cloned partitions keep an object's unique id:
an RSA key's CKA_UNIQUE_ID is derived from its class and modulus, so the same key
imported into several SoftHSM tokens has the same id on each, and two different keys
with the same CKA_ID and CKA_LABEL have different ones. Objects without a modulus have
no CKA_UNIQUE_ID (CKR_ATTRIBUTE_TYPE_INVALID), like a module lacking it.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from typing import Any

from p11gate.backends.native import NativeModule
from p11gate.codec import Attribute, AttrRequest, ckr
from p11gate.codec import constants as ck
from p11gate.codec.calls import CALLS_BY_NAME

ID = {n: CALLS_BY_NAME[n].id for n in ("C_GetAttributeValue", "C_FindObjectsInit",
                                       "C_FindObjects", "C_FindObjectsFinal")}
CKA_MODULUS = 0x120


def main() -> int:
    real_call = NativeModule.call
    finds: dict[int, list[int]] = {}  # session → handles left of an emulated find
    lock = threading.Lock()

    def unique_id(mod: NativeModule, session: int, handle: int) -> bytes | None:
        attrs, _ = real_call(mod, ID["C_GetAttributeValue"], [
            session, handle, [AttrRequest(ck.CKA_CLASS, 8), AttrRequest(CKA_MODULUS, 1024)]])
        cls, modulus = attrs
        if modulus.length is None or not modulus.value:
            return None
        digest = hashlib.sha256(cls.value.to_bytes(8, "little") + bytes(modulus.value))
        return digest.hexdigest()[:32].encode()

    def call(self: NativeModule, call_id: int, args: list[Any]) -> list[Any]:
        if call_id == ID["C_GetAttributeValue"]:
            wanted = [i for i, r in enumerate(args[2]) if r.type == ck.CKA_UNIQUE_ID]
            attrs, rv = real_call(self, call_id, args)
            if not wanted:
                return [attrs, rv]
            uid = unique_id(self, args[0], args[1])
            if uid is not None:
                attrs = list(attrs)
                for i in wanted:
                    size = args[2][i].length
                    attrs[i] = (Attribute(ck.CKA_UNIQUE_ID, None, len(uid)) if size == 0 else
                                Attribute(ck.CKA_UNIQUE_ID, uid, len(uid)) if size >= len(uid)
                                else Attribute(ck.CKA_UNIQUE_ID, None, None))
                if rv == ckr.ATTRIBUTE_TYPE_INVALID and all(a.length is not None
                                                            for a in attrs):
                    rv = ckr.OK
            return [attrs, rv]
        if call_id == ID["C_FindObjectsInit"]:
            wanted_uid = [a.value for a in args[1] if a.type == ck.CKA_UNIQUE_ID]
            if not wanted_uid:
                return real_call(self, call_id, args)
            rest = [a for a in args[1] if a.type != ck.CKA_UNIQUE_ID]
            real_call(self, call_id, [args[0], rest])
            handles: list[int] = []
            try:
                while True:
                    (batch,) = real_call(self, ID["C_FindObjects"], [args[0], 64])
                    handles += batch
                    if len(batch) < 64:
                        break
            finally:
                real_call(self, ID["C_FindObjectsFinal"], [args[0]])
            with lock:
                finds[args[0]] = [h for h in handles
                                  if unique_id(self, args[0], h) == bytes(wanted_uid[0])]
            return []
        if call_id == ID["C_FindObjects"]:
            with lock:
                left = finds.get(args[0])
                if left is not None:
                    out, finds[args[0]] = left[:args[1]], left[args[1]:]
                    return [out]
        if call_id == ID["C_FindObjectsFinal"]:
            with lock:
                if finds.pop(args[0], None) is not None:
                    return []
        return real_call(self, call_id, args)

    NativeModule.call = call  # type: ignore[method-assign]
    from p11gate.worker import main as worker_main

    if len(sys.argv) != 2:
        raise SystemExit("usage: unique_id_module.py MODULE")
    return worker_main(sys.argv[1], threads=4)


if __name__ == "__main__":
    sys.exit(main())

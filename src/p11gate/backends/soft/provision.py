"""Make a ready soft token file in one go: initialised, user PIN set, key pairs in it.

Used by demo mode and by tests that need the same keys in a soft token as in their
SoftHSM token. It goes through the token's own PKCS#11 calls (C_InitToken, C_InitPIN,
C_GenerateKeyPair), so the file is exactly what a client would have made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ...codec.values import Attribute, Mechanism
from . import mechanisms as M
from . import objects as O
from . import ops
from .store import SoftStore
from .token import CKF_RW_SESSION, CKF_SERIAL_SESSION, CKU_SO, CKU_USER, SLOT, SoftToken

#: DER OBJECT IDENTIFIER of each named curve a key spec may ask for
CURVES = {"P-256": bytes.fromhex("06082a8648ce3d030107"),
          "P-384": bytes.fromhex("06052b81040022")}


@dataclass(frozen=True)
class KeySpec:
    """One key pair: ``kind`` "P-256", "P-384" or "rsa:BITS"; CKA_ID and CKA_LABEL."""
    kind: str
    key_id: bytes
    label: str


def _bool(t: int, v: bool) -> Attribute:
    return Attribute(t, int(v), 1)


def _bytes(t: int, v: bytes) -> Attribute:
    return Attribute(t, v, len(v))


def _templates(spec: KeySpec) -> tuple[int, list[Attribute], list[Attribute]]:
    common = [_bool(O.CKA_TOKEN, True), _bytes(O.CKA_ID, spec.key_id),
              _bytes(O.CKA_LABEL, spec.label.encode())]
    if spec.kind.startswith("rsa:"):
        bits = int(spec.kind.removeprefix("rsa:"))
        pub = [*common, Attribute(O.CKA_MODULUS_BITS, bits, 8),
                        _bool(O.CKA_ENCRYPT, True), _bool(O.CKA_VERIFY, True)]
        priv = [*common, _bool(O.CKA_PRIVATE, True), _bool(O.CKA_SENSITIVE, True),
                         _bool(O.CKA_DECRYPT, True), _bool(O.CKA_SIGN, True)]
        return M.CKM_RSA_PKCS_KEY_PAIR_GEN, pub, priv
    pub = [*common, _bytes(O.CKA_EC_PARAMS, CURVES[spec.kind]), _bool(O.CKA_VERIFY, True)]
    priv = [*common, _bool(O.CKA_PRIVATE, True), _bool(O.CKA_SENSITIVE, True),
                     _bool(O.CKA_SIGN, True), _bool(O.CKA_DERIVE, True)]
    return M.CKM_EC_KEY_PAIR_GEN, pub, priv


async def provision(path: str, label: str, so_pin: bytes, user_pin: bytes,
                    keys: Sequence[KeySpec] = ()) -> bool:
    """Initialise the token in ``path`` and generate ``keys`` in it, unless it is
    initialised already (then nothing changes). True if it was made now."""
    store = SoftStore(path)
    try:
        token = SoftToken(store)
        if store.initialized:
            return False
        await token.init_token([SLOT, so_pin, label.encode()])
        (s,) = token.open_session([SLOT, CKF_RW_SESSION | CKF_SERIAL_SESSION])
        await token.login_call([s, CKU_SO, so_pin])
        await token.init_pin([s, user_pin])
        token.logout([s])
        await token.login_call([s, CKU_USER, user_pin])
        for spec in keys:
            mech, pub, priv = _templates(spec)
            await ops.generate_key_pair(token, [s, Mechanism(mech), pub, priv])
        token.close_all([SLOT])
        return True
    finally:
        store.close()


def provision_sync(path: str, label: str, so_pin: bytes, user_pin: bytes,
                   keys: Sequence[KeySpec] = ()) -> bool:
    """``provision`` for callers without an event loop (demo mode before it starts)."""
    return asyncio.run(provision(path, label, so_pin, user_pin, keys))

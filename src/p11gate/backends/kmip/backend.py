"""The KMIP back end (``[[backend]] type = "kmip"``): a KMIP server as one PKCS#11 token.

Calls that need the server run on the connection pool's threads (pool.py), so the event
loop never waits on the network; the rest (sessions, find, attributes) is answered from
the identity map in the state store (idmap.py). A call this back end does not implement gives
CKR_FUNCTION_NOT_SUPPORTED, a mechanism the server cannot do CKR_MECHANISM_INVALID.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec.calls import CALLS
from ...errors import BackendUnavailable, Pkcs11Error
from ...state.base import StateStore, StoreError
from ..token_backend import TokenBackend, TokenHandler
from ..token_backend import call_id as _id
from ..token_backend import method as _m
from .idmap import IdMap
from .pool import KmipPool
from .token import KmipToken

if TYPE_CHECKING:
    from ...config import BackendConfig

log = logging.getLogger("p11gate.backend")

Handler = TokenHandler[KmipToken]


HANDLERS: dict[int, Handler] = {_id(f"C_{k}"): _m(v) for k, v in {
    "GetInfo": "get_info", "GetSlotList": "slot_list", "GetSlotInfo": "slot_info",
    "GetTokenInfo": "token_info", "GetMechanismList": "mechanism_list",
    "GetMechanismInfo": "mechanism_info", "OpenSession": "open_session",
    "CloseSession": "close_session", "CloseAllSessions": "close_all",
    "GetSessionInfo": "session_info", "Login": "login", "Logout": "logout",
    "CreateObject": "create_object", "DestroyObject": "destroy_object",
    "GetAttributeValue": "get_attribute_value", "FindObjectsInit": "find_init",
    "FindObjects": "find", "FindObjectsFinal": "find_final", "GenerateKey": "generate_key",
    "GenerateKeyPair": "generate_key_pair", "GenerateRandom": "generate_random",
}.items()}


def _kind(kind: str, what: str) -> Handler:
    def call(t: KmipToken, args: list[Any]) -> list[Any] | Awaitable[list[Any]]:
        if what == "init":
            return t.op_init(kind, args)
        if what == "update":
            return t.op_update(kind, args)
        return t.finish(kind, args, args[1] if what == "one" else None)
    return call


for _k in ("Sign", "Encrypt", "Decrypt"):
    HANDLERS[_id(f"C_{_k}Init")] = _kind(_k.lower(), "init")
    HANDLERS[_id(f"C_{_k}")] = _kind(_k.lower(), "one")
    HANDLERS[_id(f"C_{_k}Final")] = _kind(_k.lower(), "final")
HANDLERS[_id("C_SignUpdate")] = _kind("sign", "update")
HANDLERS[_id("C_VerifyInit")] = _kind("verify", "init")
HANDLERS[_id("C_VerifyUpdate")] = _kind("verify", "update")
HANDLERS[_id("C_Verify")] = lambda t, a: t.verify(a, a[1], a[2])
HANDLERS[_id("C_VerifyFinal")] = lambda t, a: t.verify(a, None, a[1])


class KmipBackend(TokenBackend[KmipToken]):
    def __init__(self, cfg: BackendConfig, store: StateStore) -> None:
        assert cfg.kmip is not None
        self.name = cfg.name
        self.cfg = cfg
        self.kmip = cfg.kmip
        self.store = store
        self._token: KmipToken | None = None

    async def start(self) -> None:
        # PyKMIP's own records name key files and request details, and warn at every
        # connection about its absent config file: the pool logs what matters
        logging.getLogger("kmip").setLevel(logging.ERROR)
        k = self.kmip
        try:
            pin = k.pin()
            idmap = IdMap(self.store, self.name, k.idmap_path)
            objects = idmap.load()
        except (OSError, sqlite3.Error, StoreError) as e:
            raise BackendUnavailable(f"{self.name}: cannot read the KMIP identity map or PIN "
                                     f"file: {type(e).__name__}") from None
        # the server is not contacted here: a KMIP server that is down at start makes
        # calls fail with CKR_DEVICE_ERROR until it is back, not the gateway refuse to run
        self._token = KmipToken(KmipPool(k, self.name), idmap, objects, pin, self.cfg.label)
        self.generation += 1
        log.info("backend up", extra={"backend": self.name, "type": "kmip",
                                      "server": f"{k.host}:{k.port}",
                                      "objects": len(self._token.objects),
                                      "generation": self.generation})

    async def stop(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            token.pool.close()

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        token, handler = self._token_and_handler(HANDLERS, call_id, args)
        try:
            result = handler(token, args)
            if isinstance(result, Awaitable):
                return await result
            return result
        except StoreError as e:
            # the identity map could not be read or written: the object is not reported
            # created (CKR_DEVICE_ERROR)
            log.error("KMIP identity map failed", extra={"backend": self.name,
                                                         "reason": e.reason})
            raise
        except Pkcs11Error:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
            log.warning("KMIP token refused odd arguments",
                        extra={"backend": self.name, "call": CALLS[call_id].name})
            raise Pkcs11Error(ckr.ARGUMENTS_BAD) from None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "kmip"
        d["server"] = f"{self.kmip.host}:{self.kmip.port}"
        if self._token is not None:
            d["objects"] = len(self._token.objects)
            d["connection_errors"] = self._token.pool.errors
        return d

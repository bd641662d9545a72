"""The built-in software token back end (``[[backend]] type = "soft"``).

One token in one slot, kept in a SQLite file (see store.py for what is encrypted how).
Calls run on the event loop except key derivation from PINs, RSA key generation and
signing, which run in threads. Every call this back end does not implement gives
CKR_FUNCTION_NOT_SUPPORTED, every mechanism it does not implement CKR_MECHANISM_INVALID.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec.calls import CALLS
from ...errors import BackendUnavailable, Pkcs11Error
from ..token_backend import TokenBackend, TokenHandler
from ..token_backend import call_id as _id
from ..token_backend import method as _m
from . import crypto_ops, ops, wrap_derive
from .store import KeyFileMismatch, SoftStore, read_key_file, read_pin_file
from .token import SoftToken

if TYPE_CHECKING:
    from ...config import BackendConfig

log = logging.getLogger("p11gate.backend")

Handler = TokenHandler[SoftToken]


HANDLERS: dict[int, Handler] = {
    _id("C_GetInfo"): _m("get_info"),
    _id("C_GetSlotList"): _m("slot_list"),
    _id("C_GetSlotInfo"): _m("slot_info"),
    _id("C_GetTokenInfo"): _m("token_info"),
    _id("C_GetMechanismList"): _m("mechanism_list"),
    _id("C_GetMechanismInfo"): _m("mechanism_info"),
    _id("C_InitToken"): _m("init_token"),
    _id("C_InitToken2"): _m("init_token"),
    _id("C_OpenSession"): _m("open_session"),
    _id("C_CloseSession"): _m("close_session"),
    _id("C_CloseAllSessions"): _m("close_all"),
    _id("C_GetSessionInfo"): _m("session_info"),
    _id("C_InitPIN"): _m("init_pin"),
    _id("C_SetPIN"): _m("set_pin"),
    _id("C_Login"): _m("login_call"),
    _id("C_Logout"): _m("logout"),
    _id("C_CreateObject"): ops.create_object,
    _id("C_DestroyObject"): ops.destroy_object,
    _id("C_GetAttributeValue"): ops.get_attribute_value,
    _id("C_SetAttributeValue"): ops.set_attribute_value,
    _id("C_FindObjectsInit"): ops.find_init,
    _id("C_FindObjects"): ops.find,
    _id("C_FindObjectsFinal"): ops.find_final,
    _id("C_GenerateKey"): ops.generate_key,
    _id("C_GenerateKeyPair"): ops.generate_key_pair,
    _id("C_GenerateRandom"): crypto_ops.generate_random,
    _id("C_Verify"): crypto_ops.verify,
    _id("C_VerifyFinal"): crypto_ops.verify_final,
    _id("C_DigestKey"): crypto_ops.digest_key,
    _id("C_WrapKey"): wrap_derive.wrap_key,
    _id("C_UnwrapKey"): wrap_derive.unwrap_key,
    _id("C_DeriveKey"): wrap_derive.derive_key,
}


def _kind(fn: Callable[[SoftToken, str, list[Any]], Any], kind: str) -> Handler:
    def call(t: SoftToken, args: list[Any]) -> Any:
        return fn(t, kind, args)
    return call


for _k in ("Sign", "Verify", "Encrypt", "Decrypt", "Digest"):
    HANDLERS[_id(f"C_{_k}Init")] = _kind(crypto_ops.op_init, _k.lower())
    if _k != "Verify":
        HANDLERS[_id(f"C_{_k}")] = _kind(crypto_ops.one_part, _k.lower())
        HANDLERS[_id(f"C_{_k}Final")] = _kind(crypto_ops.final, _k.lower())
for _k in ("Sign", "Verify", "Digest"):
    HANDLERS[_id(f"C_{_k}Update")] = _kind(crypto_ops.op_update, _k.lower())
for _k in ("Encrypt", "Decrypt"):
    HANDLERS[_id(f"C_{_k}Update")] = _kind(crypto_ops.crypt_update, _k.lower())


class SoftBackend(TokenBackend[SoftToken]):
    #: call id → handler (a layered view replaces some)
    handlers: dict[int, Handler] = HANDLERS

    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._token: SoftToken | None = None
        self._store: SoftStore | None = None

    async def start(self) -> None:
        cfg = self.cfg
        try:
            secret = None if cfg.key_file is None else read_key_file(cfg.key_file)
        except (OSError, ValueError) as e:
            raise BackendUnavailable(f"{cfg.name}: key_file: {e}") from e
        try:
            store = SoftStore(cfg.path, secret)
        except (OSError, sqlite3.Error, KeyFileMismatch) as e:
            raise BackendUnavailable(f"{cfg.path}: cannot open the soft token: {e}") from e
        token = SoftToken(store)
        if not store.initialized and cfg.init_so_pin_file and cfg.init_user_pin_file:
            try:
                so_pin = read_pin_file(cfg.init_so_pin_file)
                user_pin = read_pin_file(cfg.init_user_pin_file)
                await token.initialise_unattended(cfg.label.encode(), so_pin, user_pin)
            except (OSError, ValueError, Pkcs11Error) as e:
                store.close()
                raise BackendUnavailable(f"{cfg.name}: unattended initialisation failed: "
                                         f"{type(e).__name__}: {e}") from e
            log.info("soft token initialised from PIN files", extra={"backend": self.name})
        self._store, self._token = store, token
        self.generation += 1
        log.info("backend up", extra={"backend": self.name, "type": "soft",
                                      "generation": self.generation})

    async def stop(self) -> None:
        store, self._store, self._token = self._store, None, None
        if store is not None:
            store.close()

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        token, handler = self._token_and_handler(self.handlers, call_id, args)
        try:
            token.refresh()
            result = handler(token, args)
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                return await result
            assert isinstance(result, list)
            return result
        except Pkcs11Error:
            raise
        except sqlite3.Error as e:
            log.error("soft token store failed", extra={"backend": self.name,
                                                        "reason": type(e).__name__})
            raise Pkcs11Error(ckr.DEVICE_ERROR, "soft token store") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
            # hostile or odd arguments: never a crash, never key material in a log
            log.warning("soft token refused odd arguments",
                        extra={"backend": self.name, "call": CALLS[call_id].name})
            raise Pkcs11Error(ckr.ARGUMENTS_BAD) from None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "soft"
        d["path"] = self.cfg.path
        return d

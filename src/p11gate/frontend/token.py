"""A virtual token: one client-visible slot served by a token on a backend."""

from __future__ import annotations

import asyncio
import logging

from ..backends.base import Backend
from ..backends.slots import pad, select_slot
from ..codec import ckr
from ..codec import constants as ck
from ..codec.calls import CallId
from ..config import ConfigError, TokenConfig
from ..errors import Pkcs11Error
from ..state.base import StateStore
from .call_stats import CallStats
from .login import LoginState
from .pin_throttle import StoredPinThrottle
from .pins import MappedPins, PinThrottle
from .token_uri import client_uri, configured_uri

log = logging.getLogger("p11gate.token")

C_GetSlotList = CallId.C_GetSlotList
C_GetTokenInfo = CallId.C_GetTokenInfo
C_OpenSession = CallId.C_OpenSession
C_CloseSession = CallId.C_CloseSession
C_Login = CallId.C_Login
C_Logout = CallId.C_Logout


class VirtualToken:
    def __init__(self, cfg: TokenConfig, backend: Backend,
                 registry: StateStore | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.pin_mode = cfg.pin_mode
        #: mapped/none: the gateway, not the clients, logs the backend in
        self.gateway_login = cfg.pin_mode != "passthrough"
        # in the store when it is shared: one counter for every process and node
        self.throttle = (
            PinThrottle(cfg.max_pin_failures, cfg.pin_lockout)
            if registry is None or not registry.shared
            else StoredPinThrottle(cfg.name, cfg.max_pin_failures, cfg.pin_lockout, registry))
        self.mapped_pins: MappedPins | None = None
        if cfg.pin_mode == "mapped":
            assert registry is not None, "mapped PINs need the registry"
            self.mapped_pins = MappedPins(cfg.name, cfg.pins, registry)
        self.slot_id = cfg.virtual_slot_id
        self.backend = backend
        self.label = pad(cfg.name, 32)
        self.backend_slot: int | None = None
        #: a gateway-owned backend session: it keeps the backend's login alive when no
        #: client session is open, and carries C_Login/C_Logout
        self.control_session: int | None = None
        self.attached_generation = -1
        self.login = LoginState()
        self.login_lock = asyncio.Lock()
        #: serializes searches on the control session
        self.control_lock = asyncio.Lock()
        self._attach_lock = asyncio.Lock()
        self.last_error = ""
        #: (generation, backend handle) of session objects → the connection that made
        #: them: a session object belongs to one application (connection) only
        self.session_objects: dict[tuple[int, int], int] = {}
        #: the PKCS#11 URI clients can name it by (completed from the backend on attach)
        self.uri = configured_uri(cfg.name)
        #: calls, errors and latency of the calls on this token (`status`, `p11gate top`)
        self.stats = CallStats()

    @property
    def present(self) -> bool:
        return self.backend.up and self.attached_generation == self.backend.generation

    async def ensure(self) -> None:
        """Attach to the backend's current instance if not yet done."""
        if self.attached_generation != self.backend.generation or self.control_session is None:
            await self.attach()

    async def attach(self) -> None:
        async with self._attach_lock:
            gen = self.backend.generation
            if self.attached_generation == gen and self.control_session is not None:
                return
            try:
                self.backend_slot = await self._select_slot()
                self.uri = await client_uri(self)
                (self.control_session,) = await self.backend.call(
                    C_OpenSession, [self.backend_slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION]
                )
                if self.gateway_login:
                    await self._gateway_login()
                pin = self.login.pin()
                if pin is not None and self.login.user_type is not None:
                    # the worker restarted while clients were logged in: restore
                    try:
                        await self.backend.call(
                            C_Login, [self.control_session, self.login.user_type, pin]
                        )
                    except Pkcs11Error as e:
                        if e.rv != ckr.USER_ALREADY_LOGGED_IN:
                            log.error("re-login after restart failed; clients logged out",
                                      extra={"token": self.name, "rv": ckr.name(e.rv)})
                            self.login.clear()
                self.attached_generation = gen
                self.last_error = ""
                log.info("token attached", extra={"token": self.name, "slot": self.slot_id,
                                                  "backend": self.backend.name,
                                                  "backend_slot": self.backend_slot})
            except Pkcs11Error as e:
                self.control_session = None
                self.last_error = str(e)
                raise

    async def release_backend(self) -> None:
        """Close the gateway's own session on the backend token and forget its login
        (before C_InitToken, which a module refuses while any session is open); the
        next :meth:`ensure` opens it again."""
        async with self._attach_lock:
            control, self.control_session = self.control_session, None
            self.attached_generation = -1
            self.login.clear()
            if control is not None and self.backend.up:
                try:
                    await self.backend.call(C_CloseSession, [control])
                except Pkcs11Error as e:
                    log.warning("closing the control session failed",
                                extra={"token": self.name, "rv": ckr.name(e.rv)})

    async def _gateway_login(self) -> None:
        """mapped/none: log the backend in with the configured credential. Its value
        never leaves this function: not into logs, errors or status."""
        try:
            pin = self.cfg.backend_pin()
        except (ConfigError, OSError) as e:
            raise Pkcs11Error(ckr.GENERAL_ERROR, f"token {self.name}: {e}") from None
        try:
            await self.backend.call(C_Login, [self.control_session, ck.CKU_USER, pin])
        except Pkcs11Error as e:
            if e.rv != ckr.USER_ALREADY_LOGGED_IN:
                raise Pkcs11Error(e.rv, f"token {self.name}: the gateway's backend login "
                                  "failed (check backend_pin_file/backend_pin_env)") from None
        finally:
            del pin
        self.login.user_type = ck.CKU_USER

    async def _select_slot(self) -> int:
        return await select_slot(self.backend, self.cfg.select)

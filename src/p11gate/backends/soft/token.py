"""Soft token state: slot and token info, sessions, login, PINs (PKCS#11 semantics)."""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from ...codec import ckr
from ...codec.values import Null, Version
from ...errors import Pkcs11Error
from ..token_backend import HeldBudget
from . import mechanisms as M
from .objects import CKO_PRIVATE_KEY, CKO_SECRET_KEY, SoftObject
from .store import SO, USER, SoftStore, derive_kek

SLOT = 1
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKS_RO_PUBLIC, CKS_RO_USER, CKS_RW_PUBLIC, CKS_RW_USER, CKS_RW_SO = 0, 1, 2, 3, 4
# token flags
TF_RNG, TF_LOGIN_REQUIRED, TF_USER_PIN_INITIALIZED = 0x1, 0x4, 0x8
TF_RESTORE_KEY_NOT_NEEDED, TF_TOKEN_INITIALIZED = 0x20, 0x400
MIN_PIN, MAX_PIN = 4, 255
MAX_SESSIONS = 4096
#: fy value for a non-NULL buffer of length 0 (SPEC §3.4)
EMPTY_BUFFER = 0xFFFFFFFF
VERSION = Version(0, 1)


def pad(text: bytes, size: int) -> bytes:
    return text[:size].ljust(size, b" ")


def out_buffer(cap: Any, data: bytes) -> tuple[bool, bytes | Null]:
    """(done, reply value) for an output buffer of capacity ``cap``: a size query (0)
    or a buffer too small gives Null(length) and leaves the operation active."""
    if not isinstance(cap, int) or cap < 0:
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "output buffer")
    have = 0 if cap == EMPTY_BUFFER else cap
    if cap == 0 or have < len(data):
        return False, Null(len(data))
    return True, data


@dataclass
class Session:
    handle: int
    flags: int
    ops: dict[str, M.Operation] = field(default_factory=dict)
    found: list[int] | None = None

    @property
    def rw(self) -> bool:
        return bool(self.flags & CKF_RW_SESSION)


def check_pin(pin: Any) -> bytes:
    if not isinstance(pin, bytes):
        raise Pkcs11Error(ckr.ARGUMENTS_BAD, "PIN")
    if not MIN_PIN <= len(pin) <= MAX_PIN:
        raise Pkcs11Error(ckr.PIN_LEN_RANGE)
    return pin


class SoftToken:
    def __init__(self, store: SoftStore) -> None:
        self.store = store
        self.sessions: dict[int, Session] = {}
        self.objects: dict[int, SoftObject] = {}
        #: None, "user" or "so"
        self.login: str | None = None
        self.token_key: bytes | None = None
        self._session_ids = itertools.count(1)
        self._session_objects = itertools.count(1 << 31)
        self.lock = asyncio.Lock()
        self.held = HeldBudget(lambda: sum(op.held_bytes() for s in self.sessions.values()
                                           for op in s.ops.values()))
        self.epoch = self._store_epoch()
        for handle, attrs, sealed in store.load():
            self.objects[handle] = SoftObject(handle, attrs, sealed=sealed)

    def _store_epoch(self) -> bytes:
        # stores without a file of their own (a layered token's view) have no epoch and
        # never change behind this process's back
        return bytes(getattr(self.store, "epoch", b""))

    def refresh(self) -> None:
        """Catch up with what other processes committed to the file (cheap when nothing
        changed: one PRAGMA). Unchanged objects keep their cached key; a C_InitToken
        elsewhere logs this process out, since its token key is gone."""
        changed = getattr(self.store, "changed", None)
        if changed is None or not changed():
            return
        epoch = self._store_epoch()
        if epoch != self.epoch:
            self.epoch = epoch
            self._logged_out()
            for h in [h for h, o in self.objects.items() if o.session is None]:
                del self.objects[h]
        rows = {h: (attrs, sealed) for h, attrs, sealed in self.store.load()}
        for h in [h for h, o in self.objects.items() if o.session is None and h not in rows]:
            del self.objects[h]
        for h, (attrs, sealed) in rows.items():
            old = self.objects.get(h)
            if old is None or old.attrs != attrs or old.sealed != sealed:
                self.objects[h] = SoftObject(h, attrs, sealed=sealed)

    def next_object_handle(self) -> int:
        return next(self._session_objects)

    # ------------------------------------------------------------------ lookups

    def session(self, h: Any) -> Session:
        s = self.sessions.get(h) if isinstance(h, int) else None
        if s is None:
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        return s

    def visible(self, obj: SoftObject) -> bool:
        return not obj.private or self.login == USER

    def obj(self, h: Any, rv: int = ckr.OBJECT_HANDLE_INVALID) -> SoftObject:
        o = self.objects.get(h) if isinstance(h, int) else None
        if o is None or not self.visible(o):
            raise Pkcs11Error(rv)
        return o

    def key_value(self, obj: SoftObject) -> bytes:
        """The clear value of a private or secret key (needs the user logged in for
        token objects: the value is sealed under the token key)."""
        if obj.value is not None:
            return obj.value
        if obj.sealed is None:
            raise Pkcs11Error(ckr.GENERAL_ERROR, "key without a value")
        if self.token_key is None or self.login != USER:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        from .store import unseal

        try:
            return unseal(self.token_key, obj.handle, obj.sealed)
        except ValueError:
            raise Pkcs11Error(ckr.GENERAL_ERROR, "key value does not decrypt") from None

    def may_write(self, s: Session, token: bool, private: bool) -> None:
        if token and not s.rw:
            raise Pkcs11Error(ckr.SESSION_READ_ONLY)
        if private and self.login != USER:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)

    # ------------------------------------------------------------------ info

    def get_info(self, args: list[Any]) -> list[Any]:
        return [Version(2, 40), pad(b"p11gate", 32), 0, pad(b"p11gate soft token", 32),
                VERSION]

    def slot(self, s: Any) -> None:
        if s != SLOT:
            raise Pkcs11Error(ckr.SLOT_ID_INVALID)

    def slot_list(self, args: list[Any]) -> list[Any]:
        _present, cap = args
        return [Null(1)] if not isinstance(cap, int) or cap < 1 else [[SLOT]]

    def slot_info(self, args: list[Any]) -> list[Any]:
        self.slot(args[0])
        return [pad(b"p11gate soft token", 64), pad(b"p11gate", 32), 0x1, VERSION, VERSION]

    def token_info(self, args: list[Any]) -> list[Any]:
        self.slot(args[0])
        st = self.store
        flags = TF_RNG | TF_LOGIN_REQUIRED | TF_RESTORE_KEY_NOT_NEEDED
        if st.initialized:
            flags |= TF_TOKEN_INITIALIZED
        if st.user_pin_initialized:
            flags |= TF_USER_PIN_INITIALIZED
        rw = sum(1 for s in self.sessions.values() if s.rw)
        unavailable = 0xFFFFFFFFFFFFFFFF
        return [pad(st.label, 32), pad(b"p11gate", 32), pad(b"soft", 16), pad(st.serial, 16),
                flags, MAX_SESSIONS, len(self.sessions), MAX_SESSIONS, rw, MAX_PIN, MIN_PIN,
                unavailable, unavailable, unavailable, unavailable, VERSION, VERSION,
                pad(b"", 16)]

    def mechanism_list(self, args: list[Any]) -> list[Any]:
        self.slot(args[0])
        mechs = sorted(M.MECHANISMS)
        cap = args[1]
        return [Null(len(mechs))] if not isinstance(cap, int) or cap < len(mechs) else [mechs]

    def mechanism_info(self, args: list[Any]) -> list[Any]:
        self.slot(args[0])
        info = M.MECHANISMS.get(args[1])
        if info is None:
            raise Pkcs11Error(ckr.MECHANISM_INVALID)
        return list(info)

    # ------------------------------------------------------------------ sessions

    def open_session(self, args: list[Any]) -> list[Any]:
        slot, flags = args
        self.slot(slot)
        if not isinstance(flags, int) or not flags & CKF_SERIAL_SESSION:
            raise Pkcs11Error(ckr.SESSION_PARALLEL_NOT_SUPPORTED)
        if not flags & CKF_RW_SESSION and self.login == SO:
            raise Pkcs11Error(ckr.SESSION_READ_WRITE_SO_EXISTS)
        if len(self.sessions) >= MAX_SESSIONS:
            raise Pkcs11Error(ckr.SESSION_COUNT)
        h = next(self._session_ids)
        self.sessions[h] = Session(h, flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION))
        return [h]

    def close_session(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        del self.sessions[s.handle]
        for h in [h for h, o in self.objects.items() if o.session == s.handle]:
            del self.objects[h]
        if not self.sessions:
            self._logged_out()
        return []

    def close_all(self, args: list[Any]) -> list[Any]:
        self.slot(args[0])
        for h in list(self.sessions):
            self.close_session([h])
        return []

    def session_info(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if self.login == SO:
            state = CKS_RW_SO
        elif self.login == USER:
            state = CKS_RW_USER if s.rw else CKS_RO_USER
        else:
            state = CKS_RW_PUBLIC if s.rw else CKS_RO_PUBLIC
        return [SLOT, state, s.flags, 0]

    # ------------------------------------------------------------------ login and PINs

    async def _kek(self, pin: bytes, salt: bytes) -> bytes:
        return await asyncio.to_thread(derive_kek, pin, salt)

    async def _unlock(self, role: str, pin: bytes) -> bytes:
        wrapping = self.store.wrapping(role)
        if wrapping is None:
            raise Pkcs11Error(ckr.USER_PIN_NOT_INITIALIZED if role == USER
                              else ckr.TOKEN_NOT_RECOGNIZED)
        salt, blob = wrapping
        key = self.store.open_wrap(role, await self._kek(pin, salt), blob)
        if key is None:
            raise Pkcs11Error(ckr.PIN_INCORRECT)
        return key

    async def login_call(self, args: list[Any]) -> list[Any]:
        s, user_type, pin = args
        self.session(s)
        if user_type == CKU_CONTEXT_SPECIFIC:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        if user_type not in (CKU_SO, CKU_USER):
            raise Pkcs11Error(ckr.USER_TYPE_INVALID)
        role = SO if user_type == CKU_SO else USER
        if not isinstance(pin, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "PIN")
        # SoftHSM's order: an RO session stops an SO login before the login state counts
        if role == SO and any(not x.rw for x in self.sessions.values()):
            raise Pkcs11Error(ckr.SESSION_READ_ONLY_EXISTS)
        if self.login == role:
            raise Pkcs11Error(ckr.USER_ALREADY_LOGGED_IN)
        if self.login is not None:
            raise Pkcs11Error(ckr.USER_ANOTHER_ALREADY_LOGGED_IN)
        async with self.lock:
            key = await self._unlock(role, pin)
            if self.login is not None:  # another login won the race
                raise Pkcs11Error(ckr.USER_ANOTHER_ALREADY_LOGGED_IN
                                  if self.login != role else ckr.USER_ALREADY_LOGGED_IN)
            self.login, self.token_key = role, key
        return []

    def _logged_out(self) -> None:
        self.login = None
        self.token_key = None
        for s in self.sessions.values():
            s.ops.clear()
            s.found = None
        for o in self.objects.values():
            o.extra.clear()

    def logout(self, args: list[Any]) -> list[Any]:
        self.session(args[0])
        if self.login is None:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        self._logged_out()
        return []

    async def init_token(self, args: list[Any]) -> list[Any]:
        slot, pin, label = args
        self.slot(slot)
        if not isinstance(pin, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "PIN")
        if not self.store.initialized:
            pin = check_pin(pin)  # an initialised token compares: too short is incorrect
        if not isinstance(label, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "label")
        if self.sessions:
            raise Pkcs11Error(ckr.SESSION_EXISTS)
        async with self.lock:
            if self.store.initialized:
                await self._unlock(SO, pin)
            salt = os.urandom(16)
            kek = await self._kek(pin, salt)
            if self.sessions:
                raise Pkcs11Error(ckr.SESSION_EXISTS)
            self.store.init_token(pad(label.rstrip(b"\0 "), 32).rstrip(b" "), salt, kek)
            self.objects.clear()
            self._logged_out()
            self.epoch = self._store_epoch()
        return []

    async def init_pin(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if self.login != SO:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        if not s.rw:
            raise Pkcs11Error(ckr.SESSION_READ_ONLY)
        pin = check_pin(args[1])
        async with self.lock:
            await self._set_pin(USER, pin)
        return []

    async def _set_pin(self, role: str, pin: bytes) -> None:
        key = self.token_key
        if key is None:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        salt = os.urandom(16)
        kek = await self._kek(pin, salt)
        self.store.set_pin(role, key, salt, kek)

    async def set_pin(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if not s.rw:
            raise Pkcs11Error(ckr.SESSION_READ_ONLY)
        old = args[1]
        if not isinstance(old, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "PIN")
        new = check_pin(args[2])
        role = SO if self.login == SO else USER
        async with self.lock:
            key = await self._unlock(role, old)
            salt = os.urandom(16)
            kek = await self._kek(new, salt)
            self.store.set_pin(role, key, salt, kek)
        return []

    async def initialise_unattended(self, label: bytes, so_pin: bytes, user_pin: bytes) -> None:
        """First start with init_*_pin_file: C_InitToken + C_InitPIN in one go."""
        so_pin, user_pin = check_pin(so_pin), check_pin(user_pin)
        so_salt, user_salt = os.urandom(16), os.urandom(16)
        so_kek = await self._kek(so_pin, so_salt)
        user_kek = await self._kek(user_pin, user_salt)
        # two processes starting on a new file: the first one initialises it
        self.store.init_token(label[:32], so_salt, so_kek, only_if_new=True,
                              user=(user_salt, user_kek))
        self.epoch = self._store_epoch()

    def is_key(self, obj: SoftObject) -> bool:
        return obj.cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY)

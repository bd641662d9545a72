"""A layered soft token back end: the shared layers, and one view per identity.

The back end opens the configured layers at start (creating and initialising a missing
file with init_so_pin_file/init_user_pin_file). The gateway asks it for a *view* per
identity and token: a back end of its own (sessions, login, handles) over that
identity's stack of layers, its layer 0 opened on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...codec import CALLS_BY_NAME, ckr
from ...errors import BackendUnavailable, Pkcs11Error
from ..base import Backend
from ..token_backend import MAX_HELD, HeldBudget
from . import layered_ops
from .backend import HANDLERS, Handler, SoftBackend
from .layers import COW, RO, RW, Layer, LayeredToken
from .store import KeyFileMismatch, SoftStore, read_key_file, read_pin_file
from .token import SoftToken

if TYPE_CHECKING:
    from ...config import BackendConfig

log = logging.getLogger("p11gate.backend")

LAYERED_HANDLERS: dict[int, Handler] = {
    **HANDLERS,
    CALLS_BY_NAME["C_SetAttributeValue"].id: layered_ops.set_attribute_value,  # type: ignore[dict-item]
    CALLS_BY_NAME["C_DestroyObject"].id: layered_ops.destroy_object,  # type: ignore[dict-item]
}
ACCESS = (RO, RW, COW)
#: operation data one identity's tokens of a layered back end hold together (the token
#: of its layer 0 and those it made: each is a soft token of its own, which alone may
#: hold MAX_HELD); all identities' together hold at most MAX_HELD, as one soft token
IDENTITY_HELD = MAX_HELD // 4


def _digest(identity_key: str) -> str:
    return hashlib.sha256(b"p11gate layer 0\0" + identity_key.encode()).hexdigest()[:32]


def own_layer_file(directory: str, identity_key: str) -> str:
    """Layer 0 of one identity: named by a hash, so no identity text reaches a path."""
    return os.path.join(directory, _digest(identity_key) + ".db")


@dataclass(frozen=True)
class MadeToken:
    """A token an identity made with C_InitToken on an offered token."""

    #: the offered token it was made on
    offer: str
    #: 96 random bits, 24 hex digits
    serial: str
    label: str


def _made_index(directory: str, identity_key: str) -> str:
    return os.path.join(directory, "made", _digest(identity_key) + ".json")


def made_layer_file(directory: str, identity_key: str, serial: str) -> str:
    return os.path.join(directory, "made", f"{_digest(identity_key)}-{serial}.db")


class LayeredSoftBackend(Backend):
    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.layers: dict[str, Layer] = {}
        self._own: dict[str, Layer] = {}
        self._views: dict[tuple[Any, ...], LayerView] = {}
        self._open_lock = asyncio.Lock()
        self._made: dict[str, list[MadeToken]] = {}
        self._make_lock = asyncio.Lock()
        self._up = False
        #: what the token shared by all identities sees (status, the gateway's own
        #: session at start): no layers at all
        self._nobody: LayerView | None = None
        #: the key file's secret (read at start), bound into every layer's PIN keys
        self._file_secret: bytes | None = None
        #: operation data held: by all views, and per identity (within the first)
        self.held = HeldBudget(lambda: self._held_by_views(None))
        self._held: dict[str, HeldBudget] = {}

    @property
    def up(self) -> bool:
        return self._up

    async def _open(self, name: str, number: int, path: str) -> Layer:
        try:
            store = SoftStore(path, self._file_secret)
        except (OSError, sqlite3.Error, KeyFileMismatch) as e:
            raise BackendUnavailable(f"layer {name}: cannot open its file: {e}") from e
        try:
            if not store.initialized:
                assert self.cfg.init_so_pin_file and self.cfg.init_user_pin_file
                await SoftToken(store).initialise_unattended(
                    name.encode()[:32], read_pin_file(self.cfg.init_so_pin_file),
                    read_pin_file(self.cfg.init_user_pin_file))
            return Layer(name, number, store)
        except (OSError, ValueError, Pkcs11Error, sqlite3.Error) as e:
            store.close()
            raise BackendUnavailable(f"layer {name}: initialisation failed: "
                                     f"{type(e).__name__}") from e

    async def start(self) -> None:
        opened: dict[str, Layer] = {}
        try:
            self._file_secret = (None if self.cfg.key_file is None
                                 else read_key_file(self.cfg.key_file))
        except (OSError, ValueError) as e:
            raise BackendUnavailable(f"{self.cfg.name}: key_file: {e}") from e
        try:
            for i, lc in enumerate(self.cfg.layers):
                opened[lc.name] = await self._open(lc.name, i + 1, lc.path)
        except BackendUnavailable:
            for layer in opened.values():
                layer.store.close()
            raise
        if self.cfg.own_layer_dir is not None:
            os.makedirs(os.path.join(self.cfg.own_layer_dir, "made"), mode=0o700,
                        exist_ok=True)
        self.layers = opened
        self._up = True
        self.generation += 1
        log.info("backend up", extra={"backend": self.name, "type": "soft-layered",
                                      "layers": len(opened), "generation": self.generation})

    async def stop(self) -> None:
        self._up = False
        for layer in [*self.layers.values(), *self._own.values()]:
            layer.store.close()
        self.layers, self._own, self._views, self._nobody = {}, {}, {}, None
        self._made, self._held = {}, {}
        self.held.count = 0

    async def own_layer(self, identity_key: str, serial: str = "") -> Layer:
        """Layer 0 of an identity (``serial`` empty), or of a token it made."""
        async with self._open_lock:
            key = f"{identity_key}\0{serial}"
            layer = self._own.get(key)
            if layer is None:
                assert self.cfg.own_layer_dir is not None
                path = (made_layer_file(self.cfg.own_layer_dir, identity_key, serial)
                        if serial else own_layer_file(self.cfg.own_layer_dir, identity_key))
                layer = self._own[key] = await self._open("layer 0", 0, path)
            return layer

    def view(self, identity_key: str, grants: list[tuple[str, str]], own: bool,
             label: str, made: str = "", offer: bool = False) -> LayerView:
        """The back end one identity's virtual token uses (the same one each time):
        ``made`` is the serial of a token it made, ``offer`` an uninitialised one."""
        key = (identity_key, tuple(grants), own, made, offer)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = LayerView(self, identity_key, grants, own, label, made,
                                             offer)
        return v

    def _held_by_views(self, identity_key: str | None) -> int:
        return sum(v.held_bytes() for v in list(self._views.values())
                   if identity_key is None or v.identity_key == identity_key)

    def held_for(self, identity_key: str) -> HeldBudget:
        """The budget every token of one identity draws on (within the back end's)."""
        budget = self._held.get(identity_key)
        if budget is None:
            budget = self._held[identity_key] = HeldBudget(
                lambda: self._held_by_views(identity_key), IDENTITY_HELD, self.held)
        return budget

    # ---------------------------------------------------------- tokens made by clients

    def made_tokens(self, identity_key: str) -> list[MadeToken]:
        """The tokens an identity made (read once, then kept: asked at every connect)."""
        if self.cfg.own_layer_dir is None:
            return []
        made = self._made.get(identity_key)
        if made is None:
            try:
                with open(_made_index(self.cfg.own_layer_dir, identity_key)) as f:
                    made = [MadeToken(**m) for m in json.load(f)]
            except FileNotFoundError:
                made = []
            self._made[identity_key] = made
        return list(made)

    async def make_token(self, identity_key: str, offer: str, label: str,
                         limit: int) -> MadeToken:
        """A new token of ``identity_key``'s: a random serial, an empty layer 0 (created
        now), recorded in the identity's index (written whole, then renamed). Beyond
        ``limit`` tokens on this offer: CKR_DEVICE_MEMORY."""
        assert self.cfg.own_layer_dir is not None
        async with self._make_lock:  # two C_InitToken at once must not pass the limit
            if sum(m.offer == offer for m in self.made_tokens(identity_key)) >= limit:
                raise Pkcs11Error(ckr.DEVICE_MEMORY, "client_tokens reached")
            return await self._make(identity_key, offer, label)

    async def _make(self, identity_key: str, offer: str, label: str) -> MadeToken:
        assert self.cfg.own_layer_dir is not None
        made = MadeToken(offer, os.urandom(12).hex(), label)
        await self.own_layer(identity_key, made.serial)
        index = _made_index(self.cfg.own_layer_dir, identity_key)
        entries = [m.__dict__ for m in self.made_tokens(identity_key)] + [made.__dict__]
        tmp = index + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index)
        self._made[identity_key] = [*self.made_tokens(identity_key), made]
        return made

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        if self._nobody is None:
            self._nobody = LayerView(self, "", [], False, self.name)
        return await self._nobody.call(call_id, args)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "soft"
        d["layers"] = list(self.layers)
        d["views"] = len(self._views)
        return d


class LayerView(SoftBackend):
    """One identity's token over its stack of layers."""

    handlers = LAYERED_HANDLERS

    def __init__(self, parent: LayeredSoftBackend, identity_key: str,
                 grants: list[tuple[str, str]], own: bool, label: str, made: str = "",
                 offer: bool = False) -> None:
        super().__init__(parent.cfg)
        self._made = made
        self._offer = offer
        self.parent = parent
        self._identity_key = identity_key
        self._grants = grants
        self._own = own
        self._label = label.encode()[:32]
        self._ready = asyncio.Lock()
        self.generation = parent.generation
        #: most objects this identity's layer 0 may hold (the gateway sets it)
        self.own_limit: int | None = None

    @property
    def up(self) -> bool:
        return self.parent.up

    @property
    def identity_key(self) -> str:
        return self._identity_key

    def held_bytes(self) -> int:
        t = self._token
        return 0 if t is None else sum(op.held_bytes() for s in t.sessions.values()
                                       for op in s.ops.values())

    @property
    def offer(self) -> bool:
        return self._offer

    async def start(self) -> None:
        """The parent starts the layers; a view opens its layer 0 on first use."""

    async def stop(self) -> None:
        self._token = None

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        if self._token is None:
            async with self._ready:
                if self._token is None:
                    if not self.parent.up:
                        raise BackendUnavailable(f"backend {self.name} is not running")
                    own = (await self.parent.own_layer(self._identity_key, self._made)
                           if self._own or self._made else None)
                    stack = [(self.parent.layers[n], a) for n, a in self._grants
                             if n in self.parent.layers]
                    token = LayeredToken(self._label, own, stack)
                    if self._offer:  # C_InitToken on it makes a token
                        token.layer_store.initialized = False
                    token.layer_store.made_serial = self._made.encode()
                    token.held = self.parent.held_for(self._identity_key)
                    self._token = token
        if isinstance(self._token, LayeredToken):  # a reload may have changed it
            self._token.own_limit = self.own_limit
        return await super().call(call_id, args)

"""Layered soft tokens: one identity's view of a stack of object sets.

A *layer* is one soft store file (its own token key, its own rows). A view stacks the
identity's own layer 0 (when it has one) over the shared layers it is granted, each
``ro``, ``rw`` or ``cow``. A find sees the union; new objects go to the topmost ``rw``
layer; a change to an object of a ``cow`` layer makes a copy in layer 0 that shadows the
original for this identity only.

Handles are unique across layers: a token object's handle is ``number << 24 | row``
(layer 0 is number 0, the configured layers 1…127), session objects keep the soft
token's own range from 1 << 31 up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...codec import ckr
from ...errors import Pkcs11Error
from .objects import Attrs, SoftObject
from .store import SO, USER, SoftStore, unseal
from .token import SoftToken

ROW_BITS = 24
ROW_MASK = (1 << ROW_BITS) - 1
SESSION_OBJECTS = 1 << 31
#: most bytes one layer 0 may hold (attributes as stored, sealed values): one object may
#: weigh some 500 KiB (attributes of up to 64 KiB each), and an opened layer stays in
#: the gateway's memory, so a count of objects alone bounds little
OWN_LAYER_MAX_BYTES = 32 << 20
#: a vendor attribute, kept in the file only, naming the object a cow copy shadows
CKA_SHADOWS = 0x80000000 | 0x70670001
RO, RW, COW = "ro", "rw", "cow"


def weight(attrs: Attrs, sealed: bytes | None) -> int:
    """What an object costs a layer: its attribute values and its sealed value."""
    return sum(8 if isinstance(v, int) else len(v) + 8 for v in attrs.values()) + len(
        sealed or b"")


def compose(number: int, row: int) -> int:
    if not 0 < row <= ROW_MASK:
        raise Pkcs11Error(ckr.DEVICE_MEMORY, "layer full")
    return number << ROW_BITS | row


@dataclass(eq=False)
class Layer:
    """One object set, shared by every view that stacks it."""

    name: str
    number: int
    store: SoftStore
    #: row → object (handles composed with the layer number)
    objects: dict[int, SoftObject] = field(default_factory=dict)
    #: the layer's token key once a view unlocked it
    token_key: bytes | None = None
    #: layer 0 only: "layer:row" of a shadowed original → row of its copy, and back
    copies: dict[str, int] = field(default_factory=dict)
    shadowing: dict[int, str] = field(default_factory=dict)
    #: bytes the objects take (attributes as stored, sealed values)
    size: int = 0

    def __post_init__(self) -> None:
        for row, attrs, sealed in self.store.load():
            src = attrs.pop(CKA_SHADOWS, None)
            if isinstance(src, bytes):
                self.copies[src.decode()] = row
                self.shadowing[row] = src.decode()
            self.objects[row] = SoftObject(compose(self.number, row), attrs, sealed=sealed)
            self.size += weight(attrs, sealed)

    def add(self, attrs: Attrs, value: bytes | None, shadows: str | None = None) -> SoftObject:
        stored = attrs if shadows is None else {**attrs, CKA_SHADOWS: shadows.encode()}
        if value is not None and self.token_key is None:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        row, sealed = self.store.add(stored, value, self.token_key)
        try:
            obj = SoftObject(compose(self.number, row), attrs, sealed=sealed)
        except Pkcs11Error:
            self.store.delete(row)
            raise
        self.objects[row] = obj
        self.size += weight(attrs, sealed)
        if shadows is not None:
            self.copies[shadows] = row
            self.shadowing[row] = shadows
        return obj

    def update(self, row: int, attrs: Attrs) -> None:
        src = self.shadowing.get(row)
        self.store.update(row, attrs if src is None else {**attrs, CKA_SHADOWS: src.encode()})
        old = self.objects.get(row)
        if old is not None:
            self.size += weight(attrs, old.sealed) - weight(old.attrs, old.sealed)

    def delete(self, row: int) -> None:
        self.store.delete(row)
        old = self.objects.pop(row, None)
        if old is not None:
            self.size -= weight(old.attrs, old.sealed)
        src = self.shadowing.pop(row, None)
        if src is not None:
            self.copies.pop(src, None)


class UnionObjects(dict[int, SoftObject]):
    """The soft token's ``objects`` for a view: its session objects (kept here) and
    the token objects of its layers (kept in the layers, shared)."""

    def __init__(self, view: LayeredToken) -> None:
        super().__init__()
        self.view = view

    def _token_object(self, h: int) -> SoftObject | None:
        found = self.view.layer_of(h)
        if found is None:
            return None
        layer, _ = found
        obj = layer.objects.get(h & ROW_MASK)
        own = self.view.own
        if obj is not None and own is not None and layer is not own:
            copy = own.copies.get(f"{layer.name}:{h & ROW_MASK}")
            if copy is not None:  # this identity changed it: it sees its copy
                return own.objects.get(copy)
        return obj

    def get(self, h: Any, default: Any = None) -> Any:
        if not isinstance(h, int):
            return default
        if h >= SESSION_OBJECTS:
            return super().get(h, default)
        obj = self._token_object(h)
        return default if obj is None else obj

    def __getitem__(self, h: int) -> SoftObject:
        obj = self.get(h)
        if obj is None:
            raise KeyError(h)
        return obj

    def __contains__(self, h: object) -> bool:
        return self.get(h) is not None

    def __setitem__(self, h: int, obj: SoftObject) -> None:
        if h >= SESSION_OBJECTS:
            super().__setitem__(h, obj)
        # token objects are put in their layer by LayerStore.add

    def __delitem__(self, h: int) -> None:
        if h >= SESSION_OBJECTS:
            super().__delitem__(h)
            return
        found = self.view.layer_of(h)
        if found is None:
            raise KeyError(h)
        found[0].objects.pop(h & ROW_MASK, None)

    def pop(self, h: int, *default: Any) -> Any:
        obj = self.get(h)
        if obj is None:
            if default:
                return default[0]
            raise KeyError(h)
        del self[h]
        return obj

    def items(self) -> list[tuple[int, SoftObject]]:  # type: ignore[override]
        out = list(super().items())
        own = self.view.own
        for layer, _ in self.view.stack:
            for row, obj in layer.objects.items():
                if own is not None and layer is not own and f"{layer.name}:{row}" in own.copies:
                    continue  # shadowed by this identity's copy, listed once as that
                out.append((obj.handle, obj))
        return out

    def values(self) -> list[SoftObject]:  # type: ignore[override]
        return [o for _, o in self.items()]

    def keys(self) -> list[int]:  # type: ignore[override]
        return [h for h, _ in self.items()]

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())

    def clear(self) -> None:
        super().clear()


class LayerStore:
    """What the soft token's calls use as ``store``: writes go to the topmost
    writable layer, changes to the layer that holds the object."""

    def __init__(self, view: LayeredToken, label: bytes) -> None:
        self.view = view
        self._label = label
        #: False for a token offered uninitialised (C_InitToken makes one)
        self.initialized = True
        #: a token made by a client: its 96-bit serial (24 hex digits)
        self.made_serial = b""

    @property
    def label(self) -> bytes:
        return self._label

    @property
    def serial(self) -> bytes:
        if self.made_serial:  # CK_TOKEN_INFO has room for 16 of its 24 digits
            return self.made_serial[:16]
        first = self.view.own or self.view.stack[0][0] if self.view.stack else None
        return first.store.serial if first is not None else b"0"

    user_pin_initialized = True

    def load(self) -> list[tuple[int, Attrs, bytes | None]]:
        return []

    def add(self, attrs: Attrs, value: bytes | None, token_key: bytes | None) -> tuple[
            int, bytes | None]:
        layer = self.view.writable()
        self.view.room(layer, attrs, value)
        obj = layer.add(attrs, value)
        return obj.handle, obj.sealed

    def _layer(self, h: int) -> tuple[Layer, int]:
        found = self.view.layer_of(h)
        if found is None or found[1] != RW:
            raise Pkcs11Error(ckr.ACTION_PROHIBITED, "layer is read only")
        return found[0], h & ROW_MASK

    def update(self, h: int, attrs: Attrs) -> None:
        layer, row = self._layer(h)
        old = layer.objects.get(row)
        if old is not None:
            self.view.room(layer, attrs, replaces=old)
        layer.update(row, attrs)

    def delete(self, h: int) -> None:
        layer, row = self._layer(h)
        layer.delete(row)

    def salt(self, role: str) -> bytes | None:
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED)

    def init_token(self, *args: Any) -> bytes:
        # a layered token is made by configuration (or by a client in a new slot)
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "layered token")

    def set_pin(self, *args: Any) -> None:
        raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, "layered token: no PINs")


class LayeredToken(SoftToken):
    """One identity's soft token: sessions and login of its own, objects from layers."""

    def __init__(self, label: bytes, own: Layer | None, stack: list[tuple[Layer, str]]) -> None:
        #: top first; layer 0, when there is one, is the first and rw
        self.stack = ([(own, RW)] if own is not None else []) + stack
        self.own = own
        #: most objects layer 0 may hold (None: no bound); the gateway sets it to
        #: max_token_objects_per_identity. Counted in the file, so it holds across
        #: restarts, and it counts cow copies too
        self.own_limit: int | None = None
        self._by_number = {layer.number: (layer, access) for layer, access in self.stack}
        self.layer_store = LayerStore(self, label)
        super().__init__(self.layer_store)  # type: ignore[arg-type]
        self.objects = UnionObjects(self)

    def layer_of(self, h: int) -> tuple[Layer, str] | None:
        return self._by_number.get(h >> ROW_BITS) if 0 <= h < SESSION_OBJECTS else None

    def room(self, layer: Layer, attrs: Attrs, value: bytes | None = None,
             replaces: SoftObject | None = None) -> None:
        """CKR_DEVICE_MEMORY when a new object (or a cow copy, or a change: ``replaces``)
        would take layer 0 past its bounds: an identity's layer 0 is its own file, but
        its disk and the gateway's memory (every object of an opened layer is kept) are
        everybody's."""
        if layer is not self.own:
            return
        if replaces is None and self.own_limit is not None and \
                len(layer.objects) >= self.own_limit:
            raise Pkcs11Error(ckr.DEVICE_MEMORY, "layer 0: too many objects")
        grows = weight(attrs, None) + (0 if value is None else len(value) + 28)
        if replaces is not None:
            grows -= weight(replaces.attrs, None)
        if grows > 0 and layer.size + grows > OWN_LAYER_MAX_BYTES:
            raise Pkcs11Error(ckr.DEVICE_MEMORY, "layer 0: too many bytes")

    def writable(self) -> Layer:
        for layer, access in self.stack:
            if access == RW:
                return layer
        raise Pkcs11Error(ckr.TOKEN_WRITE_PROTECTED, "no writable layer")

    async def _unlock(self, role: str, pin: bytes) -> bytes:
        """Unlock every layer of the stack with the gateway's credential (each once)."""
        if role == SO:
            raise Pkcs11Error(ckr.USER_TYPE_INVALID, "layered token: no SO")
        first: bytes | None = None
        for layer, _ in self.stack:
            if layer.token_key is None:
                salt = layer.store.salt(USER)
                if salt is None:
                    raise Pkcs11Error(ckr.USER_PIN_NOT_INITIALIZED)
                key = layer.store.unlock(USER, await self._kek(pin, salt))
                if key is None:
                    raise Pkcs11Error(ckr.PIN_INCORRECT)
                layer.token_key = key
            first = first or layer.token_key
        return first or b"\0" * 32

    def key_value(self, obj: SoftObject) -> bytes:
        if obj.value is not None or obj.sealed is None:
            return super().key_value(obj)
        found = self.layer_of(obj.handle)
        if found is None or self.login != USER or found[0].token_key is None:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        try:
            return unseal(found[0].token_key, obj.handle & ROW_MASK, obj.sealed)
        except ValueError:
            raise Pkcs11Error(ckr.GENERAL_ERROR, "key value does not decrypt") from None

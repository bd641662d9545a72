"""The layered soft back end driven directly: handles across layers, a cow copy of a
copyable key (its value resealed under layer 0's own key, never in clear on disk), and
the configuration checks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.soft.helpers import cid

from p11gate.backends.soft.layered_backend import LayeredSoftBackend, LayerView
from p11gate.codec import Attribute, ckr
from p11gate.config import BackendConfig, ConfigError, parse_config
from p11gate.errors import Pkcs11Error

SO_PIN, USER_PIN = "unit-so-pin-1", "unit-user-pin-1"
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_VALUE = 0x0, 0x1, 0x3, 0x11
CKA_KEY_TYPE, CKA_ENCRYPT, CKA_EXTRACTABLE, CKA_COPYABLE = 0x100, 0x104, 0x162, 0x171
CKO_DATA, CKO_SECRET_KEY, CKK_AES = 0, 4, 0x1F
CKM_AES_CBC_PAD = 0x1085
KEY = bytes(range(32))


class Views:
    def __init__(self, base: Path) -> None:
        for name, pin in (("so.pin", SO_PIN), ("user.pin", USER_PIN)):
            (base / name).write_text(pin + "\n")
        self.cfg = BackendConfig(
            name="team", type="soft", init_so_pin_file=str(base / "so.pin"),
            init_user_pin_file=str(base / "user.pin"),
            layers=[{"name": "managed", "path": str(base / "managed.db")}],
            own_layer_dir=str(base / "own"))
        self.base = base
        self.loop = asyncio.new_event_loop()
        self.backend = LayeredSoftBackend(self.cfg)
        self.loop.run_until_complete(self.backend.start())

    def session(self, view: LayerView) -> int:
        (s,) = self.call(view, "C_OpenSession", 1, 6)
        self.call(view, "C_Login", s, 1, USER_PIN.encode())
        return int(s)

    def call(self, view: LayerView, name: str, *args: Any) -> list[Any]:
        return self.loop.run_until_complete(view.call(cid(name), list(args)))

    def rv(self, view: LayerView, name: str, *args: Any) -> int:
        try:
            self.call(view, name, *args)
        except Pkcs11Error as e:
            return e.rv
        return 0

    def find(self, view: LayerView, s: int, tpl: list[Any]) -> list[int]:
        self.call(view, "C_FindObjectsInit", s, tpl)
        (found,) = self.call(view, "C_FindObjects", s, 100)
        self.call(view, "C_FindObjectsFinal", s)
        return list(found)

    def encrypt(self, view: LayerView, s: int, key: int) -> bytes:
        self.call(view, "C_EncryptInit", s, (CKM_AES_CBC_PAD, b"\0" * 16), key)
        (out,) = self.call(view, "C_Encrypt", s, b"sixteen byte msg", 64)
        return bytes(out)

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.stop())
        self.loop.close()


@pytest.fixture
def views(tmp_path: Path) -> Iterator[Views]:
    v = Views(tmp_path)
    yield v
    v.close()


def _attr(t: int, v: int | bytes) -> Attribute:
    return Attribute(t, v, 1 if isinstance(v, int) else len(v))


def test_cow_copies_a_copyable_key_and_reseals_it(views: Views) -> None:
    admin = views.backend.view("uid:1", [("managed", "rw")], False, "team")
    member = views.backend.view("uid:2", [("managed", "cow")], True, "team")
    reader = views.backend.view("uid:3", [("managed", "ro")], True, "team")
    sa = views.session(admin)
    (key,) = views.call(admin, "C_CreateObject", sa, [
        _attr(CKA_CLASS, CKO_SECRET_KEY), _attr(CKA_KEY_TYPE, CKK_AES), _attr(CKA_TOKEN, 1),
        _attr(CKA_VALUE, KEY), _attr(CKA_ENCRYPT, 1), _attr(CKA_EXTRACTABLE, 1),
        _attr(CKA_COPYABLE, 1), _attr(CKA_LABEL, b"shared-aes")])
    assert key >> 24 == 1  # managed is layer number 1
    original = views.encrypt(admin, sa, key)

    sm = views.session(member)
    (own,) = views.call(member, "C_CreateObject", sm, [
        _attr(CKA_CLASS, CKO_DATA), _attr(CKA_TOKEN, 1), _attr(CKA_LABEL, b"mine")])
    assert own >> 24 == 0 and own != key  # layer 0, a handle of its own
    assert views.call(member, "C_SetAttributeValue", sm, key,
                      [_attr(CKA_LABEL, b"renamed")]) == []
    (copy,) = views.find(member, sm, [_attr(CKA_CLASS, CKO_SECRET_KEY)])
    assert copy >> 24 == 0  # the member sees one key: its copy
    assert views.encrypt(member, sm, copy) == original  # same value, resealed
    assert views.encrypt(member, sm, key) == original  # the old handle reaches the copy

    sr = views.session(reader)
    assert views.rv(reader, "C_SetAttributeValue", sr, key,
                    [_attr(CKA_LABEL, b"no")]) == ckr.ACTION_PROHIBITED
    assert views.find(reader, sr, [_attr(CKA_LABEL, b"shared-aes")]) == [key]
    assert views.find(admin, sa, [_attr(CKA_LABEL, b"renamed")]) == []
    # nothing of the key is in clear in any file
    for f in [views.base / "managed.db", *(views.base / "own").glob("*.db*")]:
        assert KEY not in f.read_bytes()


def test_a_refused_cow_change_leaves_no_copy(views: Views) -> None:
    admin = views.backend.view("uid:1", [("managed", "rw")], False, "team")
    member = views.backend.view("uid:2", [("managed", "cow")], True, "team")
    sa = views.session(admin)
    (key,) = views.call(admin, "C_CreateObject", sa, [
        _attr(CKA_CLASS, CKO_SECRET_KEY), _attr(CKA_KEY_TYPE, CKK_AES), _attr(CKA_TOKEN, 1),
        _attr(CKA_VALUE, KEY), _attr(CKA_COPYABLE, 1), _attr(CKA_LABEL, b"stays")])
    sm = views.session(member)
    # copyable but not extractable: the value may not leave its layer
    assert views.rv(member, "C_SetAttributeValue", sm, key,
                    [_attr(CKA_LABEL, b"x")]) == ckr.ACTION_PROHIBITED
    (data,) = views.call(admin, "C_CreateObject", sa, [
        _attr(CKA_CLASS, CKO_DATA), _attr(CKA_TOKEN, 1), _attr(CKA_COPYABLE, 1),
        _attr(CKA_LABEL, b"d")])
    # copyable, but CKA_CLASS is not settable: refused, and no copy is left behind
    assert views.rv(member, "C_SetAttributeValue", sm, data,
                    [_attr(CKA_CLASS, CKO_SECRET_KEY)]) == ckr.ATTRIBUTE_READ_ONLY
    assert views.find(member, sm, []) == sorted([key, data])


BASE = {"server": {"listen": "unix:path=/run/x.sock", "state_dir": "/tmp/x"},
        "rule": [{"name": "r", "uid": [1], "tokens": ["t"]}]}


def _layered(token: dict[str, Any], backend: dict[str, Any] | None = None) -> dict[str, Any]:
    b = {"name": "b", "type": "soft", "init_so_pin_file": "/so", "init_user_pin_file": "/u",
         "layers": [{"name": "managed", "path": "/m.db"}], "own_layer_dir": "/own"}
    return {**BASE, "backend": [b | (backend or {})],
            "token": [{"name": "t", "backend": "b", "pin_mode": "none",
                       "backend_pin_env": "TEAM_PIN"} | token]}


@pytest.mark.parametrize(("token", "backend", "words"), [
    ({"layers": [{"layer": "nope", "grant": [{"rule": "r"}]}]}, None, "no layer 'nope'"),
    ({"layers": [{"layer": "managed", "grant": [{"rule": "x"}]}]}, None, "no rule 'x'"),
    ({"own_layer": ["*"], "pin_mode": "passthrough", "backend_pin_env": None}, None,
     "needs pin_mode 'none' or 'mapped'"),
    ({"client_tokens": 1}, {"own_layer_dir": None}, "has no own_layer_dir"),
    ({"own_layer": ["*"]}, {"path": "/x.db"}, "has no path"),
    ({"own_layer": ["*"]}, {"init_so_pin_file": None, "init_user_pin_file": None},
     "needs init_so_pin_file"),
    ({"client_tokens": 65}, None, "less than or equal to 64"),
])
def test_layer_configuration_errors_are_named(token: dict[str, Any],
                                             backend: dict[str, Any] | None,
                                             words: str) -> None:
    raw = _layered(token, backend)
    raw["token"][0] = {k: v for k, v in raw["token"][0].items() if v is not None}
    raw["backend"][0] = {k: v for k, v in raw["backend"][0].items() if v is not None}
    with pytest.raises(ConfigError, match=words):
        parse_config(raw)


def test_a_layered_configuration_loads() -> None:
    cfg = parse_config(_layered({"own_layer": ["r"], "layers": [
        {"layer": "managed", "grant": [{"rule": "r", "access": "cow"}]}]}))
    assert cfg.backend[0].layered and cfg.token[0].layers[0].grant[0].access == "cow"

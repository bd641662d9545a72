"""`[[backend]] type = "soft"`: its keys, and that module configs are unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from p11gate.config import ConfigError, parse_config


def _cfg(backend: dict) -> dict:
    return {"server": {"listen": ["unix:path=/tmp/x.sock"]}, "backend": [backend],
            "token": [{"name": "t", "backend": backend["name"]}]}


def test_soft_backend_keys(tmp_path: Path) -> None:
    cfg = parse_config(_cfg({"name": "s", "type": "soft", "path": str(tmp_path / "s.db")}))
    b = cfg.backend[0]
    assert b.type == "soft" and b.label == "soft" and b.init_user_pin_file is None
    assert b.module == ""


@pytest.mark.parametrize(("backend", "words"), [
    ({"name": "s", "type": "soft", "path": "relative.db"}, "absolute path"),
    ({"name": "s", "type": "soft"}, "absolute path"),
    ({"name": "s", "type": "soft", "path": "/tmp/s.db", "init_user_pin_file": "/tmp/u"},
     "both"),
    ({"name": "s", "type": "soft", "path": "/tmp/s.db", "module": "/bin/sh"}, "no module"),
    ({"name": "s", "type": "soft", "path": "/tmp/s.db", "label": "x" * 33}, "label"),
    ({"name": "m"}, "module"),
    ({"name": "m", "module": "/bin/sh", "path": "/tmp/s.db"}, "soft"),
    ({"name": "m", "type": "kmip", "module": "/bin/sh"}, "type"),
])
def test_bad_backend_keys_are_named(backend: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(_cfg(backend))


def test_module_type_is_the_default() -> None:
    cfg = parse_config(_cfg({"name": "m", "module": "/bin/sh"}))
    assert cfg.backend[0].type == "module"

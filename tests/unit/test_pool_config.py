"""[[pool]] configuration: what a pool may combine, and the explanation when it may not."""

from __future__ import annotations

import pytest

from p11gate.config import ConfigError, parse_config


def cfg(**pool: object) -> dict[str, object]:
    return {"backend": [{"name": "a", "module": "/bin/sh"}, {"name": "b", "module": "/bin/sh"}],
            "pool": [{"name": "ha", "members": [{"backend": "a"}, {"backend": "b"}], **pool}],
            "token": [{"name": "t", "backend": "ha"}]}


def test_identity_defaults_to_attributes_and_unique_id_is_for_external_pools() -> None:
    assert parse_config(cfg()).pool[0].identity == "attributes"
    assert parse_config(cfg(identity="unique-id")).pool[0].identity == "unique-id"
    with pytest.raises(ConfigError, match="needs replication = 'external'"):
        parse_config(cfg(identity="unique-id", replication="gateway", wrapping_key="w"))
    with pytest.raises(ConfigError, match="identity"):
        parse_config(cfg(identity="cka_id"))


def test_wrapping_key_only_with_gateway_replication() -> None:
    with pytest.raises(ConfigError, match="only used with replication = 'gateway'"):
        parse_config(cfg(wrapping_key="w"))

"""`socket_mode`: an integer 0–0o777 or an octal string, nothing else (issue 10, point 9)."""

from __future__ import annotations

from typing import Any

import pytest
from tests.softhsm import MODULE

from p11gate.config import ConfigError, parse_config


def server(**kw: Any) -> int:
    cfg = parse_config({"server": kw,
                        "backend": [{"name": "b", "module": MODULE}],
                        "token": [{"name": "t", "backend": "b"}]})
    return cfg.server.socket_mode


def test_the_default_is_0660() -> None:
    assert server() == 0o660


@pytest.mark.parametrize(("value", "expected"), [
    (0o660, 0o660), (0o600, 0o600), (0, 0), (0o777, 0o777),
    ("0660", 0o660), ("0o660", 0o660), ("0O600", 0o600), ("660", 0o660), ("0600", 0o600),
    ("0", 0), (" 0640 ", 0o640),
])
def test_accepted(value: object, expected: int) -> None:
    assert server(socket_mode=value) == expected


@pytest.mark.parametrize("value", [
    660, 600, 0o1777, -1, 1024, True, 1.5, "0668", "rw-rw----", "0x1b6", "", "01777", "0o1000",
    "6 60", None,
])
def test_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"server\.socket_mode: .*octal string"):
        server(socket_mode=value)


def test_a_decimal_that_looks_octal_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="did you mean 0o660"):
        server(socket_mode=660)

"""`executor`: the kind of module thread of an in-process back end; an error anywhere it
would be ignored."""

from __future__ import annotations

from typing import Any

import pytest
from tests.softhsm import MODULE

from p11gate.config import ConfigError, parse_config


def backend(**kw: Any) -> Any:
    cfg = parse_config({"backend": [{"name": "b", "module": MODULE, **kw}],
                        "token": [{"name": "t", "backend": "b"}]})
    return cfg.backend[0]


def test_default_is_auto_in_both_isolations() -> None:
    assert backend().executor == "auto"
    assert backend(isolation="none").executor == "auto"


@pytest.mark.parametrize("value", ["native", "threads", "auto"])
def test_in_process_accepts_each_kind(value: str) -> None:
    assert backend(isolation="none", executor=value).executor == value


@pytest.mark.parametrize("value", ["native", "threads"])
def test_refused_where_it_would_be_ignored(value: str) -> None:
    with pytest.raises(ConfigError, match="only for isolation"):
        backend(isolation="process", executor=value)


@pytest.mark.parametrize("value", ["inline", "", "NATIVE", 1])
def test_unknown_kinds_refused(value: object) -> None:
    with pytest.raises(ConfigError):
        backend(isolation="none", executor=value)

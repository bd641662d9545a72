"""`socket_mode`: an integer 0–0o777 or an octal string, nothing else; the state
directory tightening leaves what is not ours alone (issue 10, point 9)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
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


def test_tighten_never_touches_a_world_writable_sticky_directory_or_others_files(
        tmp_path: Path) -> None:
    from p11gate.state_dir import tighten

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "someone-elses").write_text("x")
    (sticky / "someone-elses").chmod(0o644)
    (report,) = tighten(str(sticky))
    assert "sticky" in report
    assert stat.S_IMODE(sticky.stat().st_mode) == 0o1777
    assert stat.S_IMODE((sticky / "someone-elses").stat().st_mode) == 0o644
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    (own / "theirs").write_text("x")
    (own / "theirs").chmod(0o644)
    os.chown(own / "theirs", 1001, 1001)
    changed = tighten(str(own))
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert stat.S_IMODE((own / "theirs").stat().st_mode) == 0o644
    assert any("owned by uid 1001: not changed" in c for c in changed), changed

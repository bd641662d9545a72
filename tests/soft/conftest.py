"""The logged-in soft token session the mechanism tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.soft.helpers import initialised
from tests.soft.mech_driver import Tok


@pytest.fixture()
def tok(tmp_path: Path) -> Iterator[Tok]:
    d = initialised(tmp_path / "t.db")
    yield Tok(d)
    d.close()

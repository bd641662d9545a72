from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, write_config
from tests.softhsm import make_token


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module", params=["process", "none"])
def gateway(request: pytest.FixtureRequest, token: dict,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base: Path = tmp_path_factory.mktemp(f"gw-{request.param}")
    gw = Gateway(write_config(base, token, isolation=request.param))
    if request.param == "none":  # the hostile frames must reach the native executor
        up = [r for r in gw.records() if r.get("msg") == "backend up"]
        assert up and up[0].get("executor") == "native", gw.log()[-2000:]
    yield gw
    alive = gw.alive()
    rc = gw.stop()
    assert alive, f"gateway died (rc={rc}):\n{gw.log()[-4000:]}"
    assert rc == 0, f"gateway exit code {rc}:\n{gw.log()[-4000:]}"

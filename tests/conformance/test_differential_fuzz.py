"""The differential fuzzer (tests/conformance/differential.py): the same seeded sequence
of well-formed calls on two fresh identical SoftHSM tokens, one through the gateway (both
isolations), one on the module itself (a bare `p11gate worker`). Every CK_RV and output
must agree, except the deliberate differences in ``differential.ALLOWED`` (each with the
README sentence that makes it so)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, write_config
from tests.softhsm import make_token, requires_softhsm

from .differential import Differ, WorkerSide, gateway_side, make_key_material

pytestmark = requires_softhsm

CALLS = int(os.environ.get("P11GATE_DIFF_CALLS", "800"))
SEEDS = [int(x) for x in os.environ.get("P11GATE_DIFF_SEEDS", "1,2").split(",")]
KEYS = make_key_material()


def run_differ(tmp: Path, isolation: str, seed: int, calls: int = CALLS) -> Differ:
    gw_token = make_token(tmp / "gw-hsm", label="difftok", keys=False)
    direct_token = make_token(tmp / "direct-hsm", label="difftok", keys=False)
    (tmp / "gw").mkdir()
    gw = Gateway(write_config(tmp / "gw", gw_token, isolation))
    direct = None
    try:
        direct = WorkerSide(direct_token, tmp / "worker.log")
        gws = gateway_side(gw.path, "difftok")
        d = Differ(gws, direct, seed, KEYS)
        try:
            d.run(calls)
        except (ConnectionError, OSError):
            assert d.direct_dead is not None, "the gateway closed the connection"
        gws.close()
        d.gateway_alive = gw.alive()  # type: ignore[attr-defined]
        return d
    finally:
        if direct is not None:
            direct.close()
        gw.stop()


@pytest.mark.parametrize("isolation", ["process", "none"])
@pytest.mark.parametrize("seed", SEEDS)
def test_gateway_answers_as_the_module(tmp_path: Path, isolation: str, seed: int) -> None:
    d = run_differ(tmp_path, isolation, seed)
    assert d.direct_dead is None, d.direct_dead
    assert d.gateway_alive  # type: ignore[attr-defined]
    # the sequence did reach the module: most calls were well-formed and many succeeded
    assert d.calls >= CALLS and d.ok >= CALLS // 4, (d.calls, d.ok)
    shown = "\n\n".join(str(x) for x in d.divergences[:8])
    assert not d.divergences, f"{len(d.divergences)} unexplained divergences:\n{shown}"

"""The stateful fuzzer (tests/adversarial/stateful_fuzz.py) against a live gateway over
SoftHSM, a fixed number of calls from fixed seeds: the worker never restarts, the
gateway never logs its back end down, and a bystander's session lives through it. Each
of the three crashes it found (templates without values, keys of another family, raw
RSA past the modulus) is also pinned by its own test; this keeps the whole class in
view."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.adversarial.hostile import call, logged_in, stop_gateway
from tests.adversarial.stateful_fuzz import Fuzzer
from tests.gateway_proc import Gateway, worker_pids, write_config
from tests.softhsm import make_token

CALLS = 1500


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("stateful-fuzz")
    gw = Gateway(write_config(base, make_token(base / "hsm", keys=False), "process"))
    yield gw
    stop_gateway(gw)


@pytest.mark.parametrize("seed", [3, 11])
def test_stateful_fuzz_never_takes_the_worker_down(gateway: Gateway, seed: int) -> None:
    bystander, bs = logged_in(gateway, 2)
    workers = worker_pids(gateway)
    c, sess = logged_in(gateway, 2)
    f = Fuzzer(c, sess, seed)
    f.run(CALLS)
    assert gateway.alive(), gateway.log()[-3000:]
    assert worker_pids(gateway) == workers, f.outcomes.most_common(20)
    assert not [r for r in gateway.records() if r.get("msg") == "backend down"]
    assert len(call(bystander, "C_GenerateRandom", bs, 16)[0]) == 16
    # the calls reached the module: operations of several families were taken
    taken = {(cid, mech) for (cid, mech, rv), n in f.outcomes.items() if rv == 0 and mech}
    assert len(taken) >= 15, sorted(taken)
    c.close()
    bystander.close()

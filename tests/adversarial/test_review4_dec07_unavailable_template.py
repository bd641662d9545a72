"""A template attribute marked unavailable (validity byte 0: NULL value, ulValueLen
(CK_ULONG)-1) went to the module as it came. SoftHSM 2.6 takes the length as real:
C_GenerateKeyPair with such a CKA_EC_PARAMS or DSA CKA_PRIME crashes it (found by a
stateful fuzzer of raw frames). In process isolation the worker died with every tenant's
sessions on it; in-process the gateway died. A request's template gives values, so the
gateway now refuses such a template (also nested) with CKR_ATTRIBUTE_VALUE_INVALID
before policy or the module.

Raw frames, a real gateway over real SoftHSM, both isolations; a bystander's session on
the same back end must live through every attempt."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_CLASS,
    CKA_TOKEN,
    CKA_VALUE,
    CKO_DATA,
    b,
    call,
    logged_in,
    rv,
    s,
    stop_gateway,
    u,
)
from tests.gateway_proc import Gateway, worker_pids, write_config
from tests.softhsm import make_token

from p11gate.codec import Attribute, Mechanism, ckr

CKM_DSA_KEY_PAIR_GEN, CKM_EC_KEY_PAIR_GEN, CKM_AES_KEY_GEN = 0x10, 0x1040, 0x1080
CKA_PRIME, CKA_SUBPRIME, CKA_BASE, CKA_EC_PARAMS = 0x130, 0x131, 0x132, 0x180
CKA_VALUE_LEN, CKA_WRAP_TEMPLATE = 0x161, 0x40000211


def unavailable(kind: int) -> Attribute:
    return Attribute(kind, None, None)


#: call name → its arguments after the session, each with one attribute without a value
ATTEMPTS: dict[str, tuple[str, list[Any]]] = {
    "ec keygen": ("C_GenerateKeyPair", [
        Mechanism(CKM_EC_KEY_PAIR_GEN, None), [unavailable(CKA_EC_PARAMS)],
        [b(CKA_TOKEN, False)]]),
    "dsa keygen": ("C_GenerateKeyPair", [
        Mechanism(CKM_DSA_KEY_PAIR_GEN, None),
        [unavailable(CKA_PRIME), s(CKA_SUBPRIME, b"\x01" * 20), s(CKA_BASE, b"\x02" * 128)],
        [b(CKA_TOKEN, False)]]),
    "private template": ("C_GenerateKeyPair", [
        Mechanism(CKM_EC_KEY_PAIR_GEN, None),
        [s(CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"))],
        [b(CKA_TOKEN, False), unavailable(CKA_PRIME)]]),
    "nested": ("C_GenerateKey", [
        Mechanism(CKM_AES_KEY_GEN, None),
        [u(CKA_VALUE_LEN, 16), Attribute(CKA_WRAP_TEMPLATE, [unavailable(CKA_CLASS)], 24)]]),
    "create": ("C_CreateObject", [[u(CKA_CLASS, CKO_DATA), unavailable(CKA_VALUE)]]),
    "find": ("C_FindObjectsInit", [[unavailable(CKA_EC_PARAMS)]]),
}


@pytest.fixture(scope="module", params=["process", "none"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp(f"unavailable-{request.param}")
    gw = Gateway(write_config(base, make_token(base / "hsm", keys=False), request.param))
    yield gw
    stop_gateway(gw)


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
def test_unavailable_attribute_is_refused_before_the_module(gateway: Gateway,
                                                            attempt: str) -> None:
    bystander, bs = logged_in(gateway)
    workers = worker_pids(gateway)
    c, sess = logged_in(gateway)
    name, rest = ATTEMPTS[attempt]
    assert rv(c, name, sess, *rest) == ckr.ATTRIBUTE_VALUE_INVALID
    # the attacker's connection still works, and so does everyone else's
    assert len(call(c, "C_GenerateRandom", sess, 16)[0]) == 16
    assert len(call(bystander, "C_GenerateRandom", bs, 16)[0]) == 16
    assert gateway.alive()
    assert worker_pids(gateway) == workers
    assert not [r for r in gateway.records() if r.get("msg") == "backend down"]
    c.close()
    bystander.close()


def test_the_same_templates_with_values_reach_the_module(gateway: Gateway) -> None:
    """The refusal is about the missing value only: with a value the calls work."""
    c, sess = logged_in(gateway)
    pub, priv = call(c, "C_GenerateKeyPair", sess, Mechanism(CKM_EC_KEY_PAIR_GEN, None),
                     [s(CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"))],
                     [b(CKA_TOKEN, False)])
    assert pub and priv
    (obj,) = call(c, "C_CreateObject", sess, [u(CKA_CLASS, CKO_DATA), s(CKA_VALUE, b"v")])
    assert obj
    assert rv(c, "C_FindObjectsInit", sess, [u(CKA_CLASS, CKO_DATA)]) == ckr.OK
    c.close()

"""Issue 9.1, property test: random mechanism types x parameter shapes on the key calls,
as raw frames, against a live worker over SoftHSM, for a bounded time.

Properties: the worker never restarts (same pid, no "backend down" record, a bystander's
session survives), and no raw parameter the flat list does not allow is accepted: every
such call is answered CKR_MECHANISM_PARAM_INVALID (its session and key are valid, so no
earlier error applies). Run twice: through the gateway (the frontend's check), and
straight at a `p11gate worker` (the worker's own check, with no frontend in front).
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from tests.adversarial.mechparams_env import (
    DERIVED,
    LISTED_VENDOR,
    SESSION_AES,
    C_CloseSession,
    C_DeriveKey,
    C_EncryptInit,
    C_GenerateKey,
    C_SignInit,
    connect,
    gateway,
    random_ok,
)
from tests.gateway_proc import worker_pids
from tests.policy.tenants import CKF_SERIAL, C_OpenSession, slot_of
from tests.softhsm import make_token
from tests.unit.test_worker import WORKER, Peer

from p11gate.codec import (
    HANDSHAKE,
    ArgumentError,
    Dialect,
    Mechanism,
    ReplyError,
    ckr,
    dialect_for_version,
    encode_request,
)
from p11gate.codec.param_kinds import HANDLE_IN_RAW_PARAM, KINDS, raw_parameter_refusal

SECONDS = 12.0  # per phase
C_DecryptInit, C_VerifyInit, C_DigestInit, C_WrapKey = 33, 48, 37, 60
CALLS = [C_EncryptInit, C_DecryptInit, C_SignInit, C_VerifyInit, C_DigestInit, C_DeriveKey,
         C_GenerateKey, C_WrapKey]
INITS = {C_EncryptInit, C_DecryptInit, C_SignInit, C_VerifyInit, C_DigestInit}
KNOWN = sorted(KINDS)


def mechanism_type(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.7:
        return rng.choice(KNOWN)
    if r < 0.8:
        return LISTED_VENDOR
    if r < 0.9:
        return rng.randrange(0x80000000, 0xFFFFFFFF)
    return rng.randrange(0, 0x10000)


def parameter(rng: random.Random) -> bytes | None:
    ptr = struct.pack("=Q", rng.choice([0x4141414141414141, 0x10, 0xFFFFFFFFFFFFFFF0,
                                        rng.getrandbits(64)]))
    shape = rng.randrange(7)
    if shape == 0:
        return rng.choice([None, b""])
    if shape == 1:
        return rng.randbytes(rng.randrange(1, 8))
    if shape == 2:
        return ptr
    if shape == 3:  # struct-sized: pointers and lengths in a row
        n = rng.choice([2, 3, 4, 5, 6])
        return b"".join(rng.choice([ptr, struct.pack("=Q", rng.randrange(64))])
                        for _ in range(n))
    if shape == 4:
        return rng.randbytes(rng.choice([1 << 12, 1 << 16, 1 << 18]))
    if shape == 5:
        return rng.randbytes(rng.randrange(0, 80))
    return b"\0" * rng.choice([8, 16, 24, 32, 40])


def on_the_wire(d: Dialect, mtype: int, param: bytes | None) -> bytes | str | None:
    """What the receiver decodes: the raw bytes, None, or "serialized" (a typed value)."""
    if d.new_mechanisms and mtype in d.noparam:
        return None
    if param is None:
        return None
    if mtype in d.serializers:
        return "serialized"
    return param


class Fuzzer:
    """One conversation: a key session holding a session AES key, an operation session
    that is replaced whenever an init succeeds (so later inits reach the module too)."""

    def __init__(self, call: Callable[[int, list[Any]], list[Any]], dialect: Dialect,
                 slot: int, frontend: bool = True) -> None:
        self.call, self.dialect, self.slot = call, dialect, slot
        #: a gateway frontend answers (it also refuses any bytes for HANDLE_IN_RAW_PARAM)
        self.frontend = frontend
        (self.key_session,) = call(C_OpenSession, [slot, CKF_SERIAL])
        (self.key,) = call(C_GenerateKey, [self.key_session, Mechanism(0x1080, None),
                                           SESSION_AES])
        (self.s,) = call(C_OpenSession, [slot, CKF_SERIAL])
        self.outcomes: Counter[str] = Counter()

    def args(self, call_id: int, m: Mechanism) -> list[Any]:
        if call_id == C_DigestInit:
            return [self.s, m]
        if call_id == C_DeriveKey:
            return [self.s, m, self.key, DERIVED]
        if call_id == C_GenerateKey:
            return [self.s, m, SESSION_AES]
        if call_id == C_WrapKey:
            return [self.s, m, self.key, self.key, 4096]
        return [self.s, m, self.key]

    def one(self, rng: random.Random) -> None:
        mtype, param = mechanism_type(rng), parameter(rng)
        call_id = rng.choice(CALLS)
        wire = on_the_wire(self.dialect, mtype, param)
        args = self.args(call_id, Mechanism(mtype, param))
        try:
            encode_request(call_id, args, self.dialect)
        except ArgumentError:
            self.outcomes["unsendable"] += 1  # the codec serializes this type
            return
        try:
            self.call(call_id, args)
            rv = ckr.OK
        except ReplyError as e:
            rv = e.rv
        if isinstance(wire, bytes):
            why = raw_parameter_refusal(mtype, len(wire), {LISTED_VENDOR})
            if mtype in HANDLE_IN_RAW_PARAM and self.frontend:
                why = why or "carries a handle"
            if why is not None:
                assert rv == ckr.MECHANISM_PARAM_INVALID, (
                    f"{why}: call {call_id} answered {ckr.name(rv)}")
                self.outcomes["refused"] += 1
                return
        self.outcomes["passed" if rv == ckr.OK else "module-error"] += 1
        if rv == ckr.OK and call_id in INITS:
            self.call(C_CloseSession, [self.s])
            (self.s,) = self.call(C_OpenSession, [self.slot, CKF_SERIAL])


def run_for(f: Fuzzer, rng: random.Random, seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        f.one(rng)
        n += 1
    return n


@pytest.mark.parametrize("version", [0, 2])
def test_fuzz_through_the_gateway(tmp_path_factory: pytest.TempPathFactory,
                                  version: int) -> None:
    rng = random.Random(0x9100 + version)
    with gateway(tmp_path_factory.mktemp("mpfuzz"), "process") as gw:
        bystander = connect(gw.path, 2)
        slot = slot_of(bystander, "shared")
        (bs,) = bystander.call(C_OpenSession, [slot, CKF_SERIAL])
        workers = worker_pids(gw)
        c = connect(gw.path, version)
        f = Fuzzer(c.call, c.dialect, slot)
        n = run_for(f, rng, SECONDS / 2)
        assert gw.alive(), gw.log()[-3000:]
        assert worker_pids(gw) == workers, f.outcomes
        assert [r for r in gw.records() if r.get("msg") == "backend down"] == []
        assert random_ok(bystander, bs)
        assert f.outcomes["refused"] > n // 4 and f.outcomes["passed"] > 0, f.outcomes
        print(f"gateway, version {version}: {n} calls, {dict(f.outcomes)}")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_token(tmp_path_factory.mktemp("softhsm-fuzz"), label="direct")


def test_fuzz_the_worker_directly(hsm: dict[str, Any]) -> None:
    rng = random.Random(0x9101)
    peer = Peer([*WORKER, hsm["module"], "--raw-parameter-mechanism", f"{LISTED_VENDOR:#x}"],
                hsm["env"])
    try:
        peer.handshake(2)
        peer.call(1, [HANDSHAKE, 0, b"\0"])
        (slots,) = peer.call(4, [1, 16])
        f = Fuzzer(peer.call, dialect_for_version(2), slots[0], frontend=False)
        n = run_for(f, rng, SECONDS)
        assert peer.proc.poll() is None, "the worker died"
        (data,) = peer.call(64, [f.key_session, 16])
        assert len(data) == 16
        assert f.outcomes["refused"] > n // 4 and f.outcomes["passed"] > 0, f.outcomes
        print(f"worker: {n} calls, {dict(f.outcomes)}")
    finally:
        peer.close()

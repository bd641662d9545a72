"""Run one PKCS#11 scenario three ways and collect (CK_RV, result) per step.

* ``direct``: SoftHSM loaded in this process through p11gate's cffi loader
  (:class:`p11gate.backends.native.NativeModule`), called with the same argument values
  an RPC request carries;
* ``gateway``: a plain gateway token over that kind of token, through :class:`RawClient`
  (so the codes are exactly what the gateway puts on the wire);
* ``pool``: a two-member pool token (both members SoftHSM tokens with the same keys and
  PIN), through :class:`RawClient` as well.

Each way's token is its own SoftHSM token holding the same key material (EC P-256 id 01
"ec1", RSA-2048 id 02 "rsa1", user PIN 1234, SO PIN 5678), so results compare exactly.

A scenario is a list of :class:`Step`. Arguments may hold placeholders resolved per way
at run time: :data:`SLOT` (that way's slot id) and :class:`Ref` (a value saved by an
earlier step). A scenario starts as a fresh application: C_Initialize (direct: after a
C_Finalize; gateways: on a new connection) and ends with C_Finalize.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.gateway_proc import Gateway, RawClient, write_config
from tests.pools.members import PIN, make_member, pool_config

from p11gate.backends.native import NativeModule
from p11gate.codec import V026, Null, ReplyError
from p11gate.codec.calls import CALLS_BY_NAME
from p11gate.errors import Pkcs11Error

SO_PIN = "5678"
CKF_RW_SERIAL, CKF_RO_SERIAL = 6, 4

Outcome = tuple[int, Any]


class _Slot:
    def __repr__(self) -> str:
        return "SLOT"


#: the way's slot id
SLOT = _Slot()


@dataclass(frozen=True)
class Ref:
    """A value saved by an earlier step (``index`` into it when it is a list)."""

    name: str
    index: int | None = None


def _default_norm(values: list[Any]) -> Any:
    return values


def handle_out(values: list[Any]) -> Any:
    """A reply whose values are new handles: handles differ by design, their number not."""
    return ["<handle>" for _ in values]


def found(values: list[Any]) -> Any:
    """C_FindObjects: how many handles, not which."""
    (hs,) = values
    return len(hs) if isinstance(hs, list) else hs


def session_state(values: list[Any]) -> Any:
    """C_GetSessionInfo: state and flags (the slot id is the way's)."""
    return [values[1], values[2]]


def length_of(values: list[Any]) -> Any:
    """An output whose bytes differ by nature (ECDSA): its length, or the Null size."""
    (v,) = values
    return len(v) if isinstance(v, bytes) else v


@dataclass
class Step:
    call: str
    args: list[Any]
    #: save the first reply value (or the whole list for C_FindObjects) under this name
    save: str | None = None
    norm: Callable[[list[Any]], Any] = _default_norm

    @property
    def call_id(self) -> int:
        return CALLS_BY_NAME[self.call].id


@dataclass
class Scenario:
    name: str
    steps: list[Step]
    doc: str = ""


class Way(Protocol):
    name: str

    def begin(self) -> int:
        """Start a fresh application; return the slot id."""

    def call(self, call_id: int, args: list[Any]) -> list[Any]:
        """One call; raise an exception with ``.rv`` for a CK_RV other than CKR_OK."""

    def end(self) -> None:
        """C_Finalize: end the application's sessions and login."""


class DirectWay:
    name = "direct"

    def __init__(self, token: dict[str, Any]) -> None:
        self.token = token
        self.module = NativeModule(token["module"])
        self.slot = -1

    def begin(self) -> int:
        # SoftHSM reads its configuration at C_Initialize (the variable is put back
        # right after, for anything else in this process)
        before = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = self.token["conf"]
        try:
            self.module.initialize()
        finally:
            if before is None:
                del os.environ["SOFTHSM2_CONF"]
            else:
                os.environ["SOFTHSM2_CONF"] = before
        if self.slot < 0:
            (slots,) = self.module.call(CALLS_BY_NAME["C_GetSlotList"].id, [1, 16])
            for s in slots:
                info = self.module.call(CALLS_BY_NAME["C_GetTokenInfo"].id, [s])
                if info[0].rstrip(b" ").decode() == self.token["label"]:
                    self.slot = s
        assert self.slot >= 0, "direct token not found"
        return self.slot

    def call(self, call_id: int, args: list[Any]) -> list[Any]:
        return self.module.call(call_id, args)

    def end(self) -> None:
        self.module.finalize()


class RawWay:
    def __init__(self, name: str, gw: Gateway) -> None:
        self.name = name
        self.gw = gw
        self.client: RawClient | None = None

    def begin(self) -> int:
        # the 0.26 dialect (as the direct module's attribute tables): every mechanism
        self.client = RawClient(self.gw.path, version=2, dialect=V026)
        self.client.initialize()
        (slots,) = self.client.call(CALLS_BY_NAME["C_GetSlotList"].id, [1, 8])
        assert len(slots) == 1, slots
        return int(slots[0])

    def call(self, call_id: int, args: list[Any]) -> list[Any]:
        assert self.client is not None
        return self.client.call(call_id, args)

    def end(self) -> None:
        assert self.client is not None
        try:
            self.client.call(CALLS_BY_NAME["C_Finalize"].id, [])
        finally:
            self.client.close()
            self.client = None


def resolve(v: Any, slot: int, saved: dict[str, Any]) -> Any:
    if v is SLOT:
        return slot
    if isinstance(v, Ref):
        val = saved[v.name]
        return val if v.index is None else val[v.index]
    if isinstance(v, list):
        return [resolve(x, slot, saved) for x in v]
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(resolve(x, slot, saved) for x in v)
    if hasattr(v, "_fields") and not isinstance(v, Null):  # NamedTuple (Mechanism, …)
        return type(v)(*(resolve(x, slot, saved) for x in v))
    return v


def run(way: Way, scenario: Scenario) -> list[Outcome]:
    """Run ``scenario`` on ``way``: one (rv, normalized result) per step."""
    out: list[Outcome] = []
    slot = way.begin()
    saved: dict[str, Any] = {}
    try:
        for step in scenario.steps:
            try:
                args = resolve(step.args, slot, saved)
            except KeyError as e:  # an earlier step that should have saved it failed
                out.append((-1, f"no value {e}"))
                continue
            try:
                values = way.call(step.call_id, args)
            except (Pkcs11Error, ReplyError) as e:
                out.append((e.rv, None))
                continue
            if step.save is not None and values:
                saved[step.save] = values[0]
            out.append((0, step.norm(values)))
    finally:
        way.end()
    return out


def describe(scenario: Scenario, outcomes: dict[str, Sequence[Outcome]]) -> str:
    from p11gate.codec import ckr

    lines = [f"scenario {scenario.name}:"]
    for i, step in enumerate(scenario.steps):
        row = "  ".join(
            f"{w}={ckr.name(o[i][0])}:{o[i][1]!r}" for w, o in outcomes.items() if i < len(o))
        lines.append(f"  {i:2} {step.call}: {row}")
    return "\n".join(lines)


class ThreeWays:
    """The three tokens and the two gateways. ``close()`` stops the gateways."""

    def __init__(self, base: Path, keys: dict[str, Path]) -> None:
        direct = make_member(base / "direct", 0, keys)
        plain = make_member(base / "plain", 1, keys)
        members = [make_member(base / "pool", i, keys) for i in (2, 3)]
        (base / "gw").mkdir()
        (base / "gwpool").mkdir()
        self.gateway = Gateway(write_config(base / "gw", plain))
        try:
            self.pool_gateway = Gateway(pool_config(base / "gwpool", members))
        except BaseException:
            self.gateway.stop()
            raise
        self.tokens = {"direct": direct, "gateway": plain, "pool": members[0]}
        self.ways: list[Way] = [DirectWay(direct), RawWay("gateway", self.gateway),
                                RawWay("pool", self.pool_gateway)]
        assert PIN == "1234"

    def close(self) -> list[str]:
        """Stop both gateways; the problems found (a gateway that died or failed)."""
        problems = []
        for gw in (self.gateway, self.pool_gateway):
            alive = gw.alive()
            rc = gw.stop()
            if not alive or rc != 0:
                problems.append(f"gateway rc={rc} alive={alive}:\n{gw.log()[-3000:]}")
        return problems

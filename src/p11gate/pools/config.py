"""The ``[[pool]]`` tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config_select import TokenSelect


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberConfig(_Strict):
    #: a [[backend]] name
    backend: str
    #: which token of that backend is this member
    select: TokenSelect = Field(default_factory=lambda: TokenSelect(slot_index=0))


class PoolConfig(_Strict):
    #: tokens name the pool in `backend = "<pool name>"`
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    members: list[MemberConfig] = Field(min_length=1)
    #: "external": members are kept identical by the vendor; "gateway": objects created
    #: through the pool are made on every live member (not yet: see README)
    replication: Literal["external"] = "external"
    #: backend sessions per member, including the member's control session
    max_sessions_per_member: int = Field(default=8, ge=2, le=4096)
    #: multi-part data kept per operation so it can be replayed on another member, bytes
    replay_buffer: int = Field(default=1 << 20, ge=0)
    #: seconds between attempts to bring a down member back
    probe_interval: float = Field(default=0.5, gt=0)
    #: how many members one call may be tried on before the client gets the error
    max_attempts: int = Field(default=3, ge=1)

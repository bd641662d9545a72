"""The ``[[pool]]`` tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...config_select import TokenSelect


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
    #: through the pool are made on every live member
    replication: Literal["external", "gateway"] = "external"
    #: how an object is known across members. "attributes": CKA_CLASS + CKA_ID +
    #: CKA_LABEL. "unique-id": CKA_CLASS + CKA_UNIQUE_ID where the member's module reports
    #: it (falling back to the attributes where it does not) -- for vendor clusters whose
    #: cloned partitions keep an object's CKA_UNIQUE_ID, so that objects sharing a label
    #: and id stay apart. Only with external replication: copies the gateway makes get a
    #: new CKA_UNIQUE_ID on each member.
    identity: Literal["attributes", "unique-id"] = "attributes"
    #: gateway replication: CKA_LABEL of an AES key present on every member (CKA_WRAP and
    #: CKA_UNWRAP), under which generated keys are copied between members
    wrapping_key: str | None = None
    #: backend sessions per member, including the member's control session
    max_sessions_per_member: int = Field(default=8, ge=2, le=4096)
    #: multi-part data kept per operation so it can be replayed on another member, bytes
    replay_buffer: int = Field(default=1 << 20, ge=0)
    #: seconds between attempts to bring a down member back
    probe_interval: float = Field(default=0.5, gt=0)
    #: seconds between "pool stats" log records (each member's state, outstanding
    #: calls, latency, failovers, sessions leased); 0 = none
    stats_interval: float = Field(default=60.0, ge=0)
    #: how many members one call may be tried on before the client gets the error
    max_attempts: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _wrapping(self) -> PoolConfig:
        if self.wrapping_key is not None and self.replication != "gateway":
            raise ValueError("wrapping_key is only used with replication = 'gateway'")
        if self.identity == "unique-id" and self.replication != "external":
            raise ValueError("identity = 'unique-id' needs replication = 'external' (the "
                             "gateway's copies get a different CKA_UNIQUE_ID on each member)")
        return self

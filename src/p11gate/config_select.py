"""How a configuration picks one token of a backend (shared by tokens and pool members)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TokenSelect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None = None
    serial: str | None = None
    slot_index: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenSelect:
        given = [k for k in ("label", "serial", "slot_index") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of label, serial or slot_index")
        return self

"""How a configuration picks one token of a backend (shared by tokens and pool members).

Either the table form (``select = { label = "anchor" }``) or a PKCS#11 URI (RFC 7512,
``select = "pkcs11:token=anchor;serial=…"``), whose attributes must all match.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .pkcs11_uri import parse_token_uri


class TokenSelect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None = None
    serial: str | None = None
    slot_index: int | None = Field(default=None, ge=0)
    # from a PKCS#11 URI (manufacturer=, model=, slot-id=); every given field must match
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = Field(default=None, ge=0)
    #: the URI this selection was written as (for messages)
    uri: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_uri(cls, data: Any) -> Any:
        if isinstance(data, str):
            fields: dict[str, Any] = dict(parse_token_uri(data))
            fields["uri"] = data
            return fields
        if isinstance(data, dict) and "uri" in data:
            raise ValueError('write a URI as select = "pkcs11:…", not as a table key')
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenSelect:
        if self.uri is not None:
            return self  # a URI names at least one attribute (checked when parsed)
        if self.manufacturer is not None or self.model is not None or self.slot_id is not None:
            raise ValueError("manufacturer, model and slot-id are selected with a PKCS#11 "
                             'URI: select = "pkcs11:manufacturer=…;model=…"')
        given = [k for k in ("label", "serial", "slot_index") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of label, serial or slot_index "
                             '(or a PKCS#11 URI: select = "pkcs11:token=…")')
        return self

    def matches(self, slot_id: int, info: list[Any]) -> bool:
        """Does C_GetTokenInfo ``info`` of backend slot ``slot_id`` fit every attribute?"""
        from .pkcs11_uri import padded_text

        if self.slot_id is not None and slot_id != self.slot_id:
            return False
        wanted = ((self.label, info[0]), (self.manufacturer, info[1]),
                  (self.model, info[2]), (self.serial, info[3]))
        return all(w is None or padded_text(got) == w for w, got in wanted)

    def describe(self) -> str:
        if self.uri is not None:
            return self.uri
        return ", ".join(f"{k}={v!r}" for k, v in self.model_dump(exclude_none=True).items())

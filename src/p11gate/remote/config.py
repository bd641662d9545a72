"""The ``[tls]`` section: the gateway's certificate and how it checks clients."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, field_validator


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the gateway's certificate chain (PEM)
    cert: str
    #: its private key (PEM, unencrypted; keep it 0600)
    key: str
    #: trust anchors for client certificates (PEM, one or more CA certificates)
    client_ca: str
    #: certificate revocation list(s) of those CAs (PEM); checked for client certificates
    crl: str | None = None

    @field_validator("cert", "key", "client_ca", "crl")
    @classmethod
    def _readable(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"{v!r} does not exist (give the path of a PEM file)")
        return v

"""The ``[tls]`` section: the gateway's certificate and how it checks clients.

Every file is read and checked here, so `p11gate check-config` reports a wrong path, a
key that is not the certificate's, an encrypted key, junk instead of PEM, or an expired
or foreign CRL, naming the file and the key (e.g. ``tls.key: '/etc/…' is not the key of
the certificate in '/etc/…'``), instead of the gateway failing when it starts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from . import pem


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the gateway's certificate chain (PEM)
    cert: str
    #: its private key (PEM, unencrypted; keep it 0600)
    key: str
    #: trust anchors for client certificates (PEM, one or more CA certificates)
    client_ca: str
    #: intermediate CA certificates (PEM) between client certificates and client_ca,
    #: whose CRLs the crl file holds; not trust anchors (clients still send their chain)
    intermediate_ca: str | None = None
    #: certificate revocation list(s) of those CAs (PEM, one file: a bundle with one CRL
    #: per CA); checked for every certificate of a client's chain
    crl: str | None = None
    #: seconds between checks of the CRL file; a changed file is reloaded
    crl_check_interval: float = Field(default=60.0, ge=0.1, le=86400)

    @field_validator("cert")
    @classmethod
    def _cert(cls, v: str) -> str:
        pem.certificates(v, "the gateway's PEM certificate chain")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str, info: ValidationInfo) -> str:
        pem.check_key(v, info.data.get("cert"))
        return v

    @field_validator("client_ca")
    @classmethod
    def _client_ca(cls, v: str) -> str:
        pem.certificates(v, "the PEM file of the CA certificates clients chain to")
        return v

    @field_validator("intermediate_ca")
    @classmethod
    def _intermediate_ca(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            pem.intermediates(v, info.data.get("client_ca"))
        return v

    @field_validator("crl")
    @classmethod
    def _crl(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            pem.check_crl(v, info.data.get("client_ca"), info.data.get("intermediate_ca"))
        return v

"""The ``[metrics]`` section: where the Prometheus endpoint listens (off by default),
and whether it speaks HTTPS (with client certificates, if asked)."""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


def parse_tcp(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 as ``"[::1]:9464"``) → (host, port); ValueError if not."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. \"127.0.0.1:9464\") or "
                         "unix:path=/absolute/path")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{address!r}: an IPv6 address goes in brackets: [::1]:9464")
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, int(port)


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: None = no endpoint (the default). "127.0.0.1:9464" (port 0: any free port, printed
    #: at start) or "unix:path=/abs/path"; serves GET /metrics, plain HTTP: keep it on
    #: localhost or a management network (no secrets, but it shows what is used)
    listen: str | None = None
    #: HTTPS instead of HTTP on a TCP address: the server's certificate chain and key
    #: (PEM, absolute paths; both or neither). Read at start (a new certificate needs a
    #: restart). TLS 1.2 or newer.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: with TLS: only scrapers with a client certificate from this CA bundle (PEM) are
    #: answered; others fail the handshake. None: any client (server TLS only)
    tls_client_ca: str | None = None

    @model_validator(mode="after")
    def _tls(self) -> MetricsConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("metrics: give tls_cert and tls_key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("metrics.tls_client_ca needs tls_cert and tls_key")
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, key)
            if path is None:
                continue
            if not os.path.isabs(path):
                raise ValueError(f"metrics.{key}: {path!r}: give an absolute path")
            if not os.path.isfile(path):
                raise ValueError(f"metrics.{key}: {path!r} does not exist")
        if self.tls_cert is not None and (self.listen is None
                                          or self.listen.startswith("unix:")):
            raise ValueError("metrics: TLS needs a TCP listen address (HOST:PORT); a unix "
                             "socket is protected by its mode (0600)")
        return self

    @field_validator("listen")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("unix:"):
            path = v.removeprefix("unix:path=")
            if path == v or not os.path.isabs(path):
                raise ValueError(f"{v!r}: a unix address is unix:path=/absolute/path")
            return v
        parse_tcp(v)
        return v

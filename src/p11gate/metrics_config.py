"""The ``[metrics]`` section: where the Prometheus endpoint listens (off by default)."""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, field_validator


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

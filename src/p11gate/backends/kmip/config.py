"""``[backend.kmip]``: where the KMIP server is and how the gateway talks to it.

Defaults are those of KMIP clients in the field: 5 s to connect, read and write, a few
pooled connections, a couple of retries with back-off when a connection cannot be made.
The password is read from a file or an environment variable when a connection is made,
never kept in the configuration object, so it cannot reach ``check-config`` or a log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KMIP_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4", "2.0")


class KmipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    port: int = Field(default=5696, ge=1, le=65535)
    #: the name the server's certificate must carry (subjectAltName, RFC 6125); default:
    #: host. PyKMIP does not check it, p11gate does, on every connection
    server_name: str | None = Field(default=None, min_length=1)
    #: client certificate and its key (PEM), and the CA that signed the server's certificate
    cert: str
    key: str
    ca: str
    #: optional KMIP Credential (username/password); the password from a file or env var
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    #: the KMIP protocol version requests are made in
    kmip_version: Literal["1.0", "1.1", "1.2", "1.3", "1.4", "2.0"] = "1.2"
    #: seconds; a TLS socket has one timeout for connect, read and write
    timeout: float = Field(default=5.0, gt=0, le=300)
    #: connections kept open to the server (each serves one call at a time)
    pool_size: int = Field(default=4, ge=1, le=64)
    #: deadline of one KMIP call, queueing for a connection included, seconds
    call_deadline: float = Field(default=30.0, gt=0, le=3600)
    #: attempts to connect again after a connection error, before CKR_DEVICE_ERROR
    retries: int = Field(default=2, ge=0, le=10)
    #: first back-off between attempts, seconds; it doubles at each attempt
    retry_backoff: float = Field(default=0.2, ge=0, le=30)
    #: file holding the token's user PIN (C_Login compares against it)
    pin_file: str
    #: an older gateway's identity map file, imported into the state store at start
    #: (the map lives there now); default <state_dir>/kmip-<backend name>.sqlite
    idmap_path: str = ""

    @model_validator(mode="after")
    def _paths(self) -> KmipConfig:
        for key in ("cert", "key", "ca", "pin_file"):
            p = getattr(self, key)
            if not os.path.isabs(p):
                raise ValueError(f"kmip.{key}: {p!r}: give an absolute path")
            if not os.path.isfile(p):
                raise ValueError(f"kmip.{key}: {p!r} does not exist")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("kmip: give password_file or password_env, not both")
        has_password = self.password_file is not None or self.password_env is not None
        if has_password != (self.username is not None):
            raise ValueError("kmip: username and a password (password_file or password_env) "
                             "go together")
        if self.password_env is not None:
            from ..worker_env import INHERITED

            if self.password_env in INHERITED:
                raise ValueError(f"kmip.password_env: {self.password_env!r} is passed on to "
                                 "every worker process: keep the password in a variable of "
                                 "its own (e.g. KMIP_PASSWORD)")
        if self.password_file is not None and not os.path.isabs(self.password_file):
            raise ValueError("kmip.password_file: give an absolute path")
        if self.idmap_path and not os.path.isabs(self.idmap_path):
            raise ValueError("kmip.idmap_path: give an absolute path")
        return self

    def password(self) -> str | None:
        """Read when a connection is made; never stored, never logged."""
        if self.password_file is not None:
            return Path(self.password_file).read_text().rstrip("\r\n")
        if self.password_env is not None:
            v = os.environ.get(self.password_env)
            if v is None:
                raise OSError(f"environment variable {self.password_env} is not set")
            return v
        return None

    def pin(self) -> bytes:
        return Path(self.pin_file).read_bytes().rstrip(b"\r\n")

    def describe(self) -> str:
        cred = f", credential user {self.username!r}" if self.username else ""
        return (f"KMIP {self.kmip_version} server {self.host}:{self.port} (TLS, client "
                f"certificate {self.cert}{cred}), pool {self.pool_size}, timeout "
                f"{self.timeout:g} s")

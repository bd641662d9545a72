"""``[state]``: where the gateway keeps its shared state (see :mod:`p11gate.state`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "sqlite": <state_dir>/registry.sqlite3, one host (several processes share it);
    #: "postgresql": one database shared by several gateway nodes
    engine: Literal["sqlite", "postgresql"] = "sqlite"
    #: postgresql: libpq connection string or URI, e.g. "host=db.example port=5432
    #: dbname=p11gate user=p11gate sslmode=verify-full"; put no password here (use
    #: password_file or password_env: the DSN is shown in status and messages)
    dsn: str = ""
    #: sqlite: the database file (default <state_dir>/registry.sqlite3); gateways on one
    #: host with separate state directories share their state by naming one file here
    path: str | None = None
    #: postgresql: a file holding the password (first line), read at start
    password_file: str | None = None
    #: postgresql: the name of an environment variable holding the password
    password_env: str | None = None
    #: postgresql: connections kept open by each gateway process
    pool_size: int = Field(default=4, ge=1, le=256)
    #: seconds to wait for a connection (at start: for the store to answer at all);
    #: a call that needs the store fails with CKR_DEVICE_ERROR after it
    connect_timeout: float = Field(default=3.0, gt=0, le=600)
    #: seconds one statement may run (server side statement_timeout)
    statement_timeout: float = Field(default=5.0, gt=0, le=3600)
    #: apply schema migrations at start; false = refuse to start on an older schema
    #: (then run `p11gate migrate`)
    migrate_at_start: bool = True

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> StateConfig:
        if self.engine == "postgresql" and not self.dsn:
            raise ValueError('engine "postgresql" needs dsn')
        if self.password_file and self.password_env:
            raise ValueError("password_file and password_env: give one")
        return self

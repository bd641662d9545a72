"""A throw-away PostgreSQL cluster for tests: ``initdb`` and ``pg_ctl`` from the Debian
packages (``scripts/install-deps.sh`` installs them), in a temporary directory, listening
on a unix socket only. As root the server runs as ``nobody`` (PostgreSQL refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5432


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/install-deps.sh")
    return Path(found[-1]).parent


class Postgres:
    """``with Postgres() as pg: pg.dsn`` — a superuser ``p11gate`` with a password (the
    gateway gets it from a file, as in production), trust for nobody else."""

    password = "pg-test-secret-Zq7"

    def __init__(self) -> None:
        # /tmp, not pytest's private tmp dirs: the server's user must reach its files
        self.base = Path(tempfile.mkdtemp(prefix="p11gate-pg-", dir="/tmp"))
        self.base.chmod(0o755)
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.password_file = self.base / "pg.password"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    @property
    def dsn(self) -> str:
        return f"host={self.sockdir} port={PORT} dbname=postgres user=p11gate"

    def state_toml(self, connect_timeout: float | None = 2.0) -> str:
        """The ``[state]`` table of a gateway on this server (None: the default
        connect_timeout)."""
        timeout = "" if connect_timeout is None else f"connect_timeout = {connect_timeout}\n"
        return (f'\n[state]\nengine = "postgresql"\ndsn = "{self.dsn}"\n'
                f'password_file = "{self.password_file}"\n{timeout}')

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr or proc.stdout}")

    def start(self) -> Postgres:
        b = pg_bin()
        for d in (self.data, self.sockdir):
            d.mkdir()
            if self._as:
                os.chown(d, 65534, 65534)
        pwfile = self.base / "initdb.pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, 65534, 65534)
        self._run(str(b / "initdb"), "-D", str(self.data), "-U", "p11gate", "-E", "UTF8",
                  "--auth=scram-sha-256", f"--pwfile={pwfile}")
        pwfile.unlink()
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.restart()
        return self

    def restart(self) -> None:
        self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.sockdir / "server.log"), "-w", "-o",
                  f"-k {self.sockdir} -c listen_addresses='' -p {PORT} "
                  "-c max_connections=200 -c fsync=off", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "stop")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

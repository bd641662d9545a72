"""The bench's token and targets: a throw-away SoftHSMv2 token, and the ways to reach it
-- loaded directly, through `p11-kit server`, through `p11gate serve` (process
isolation, in-process, a pool of two, the soft token, `p11-kit remote` as the worker)
and the Python floor -- each started and stopped around its cells.

Why a module of its own: starting a server, waiting for its address and cleaning it up
is process plumbing that the measuring and the verdicts need not see: they get a
:class:`Target` (module, environment, server process)."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .floor_report import FLOOR_TARGETS
from .results import Unavailable
from .tokens import import_keys, key_material, pool_config_text, soft_gateway_config, softhsm_token

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
LABEL, PIN, SO_PIN = "anchor", "1234", "5678"
START_TIMEOUT = 30.0



def make_token(base: Path) -> dict[str, str]:
    """A fresh SoftHSMv2 token "anchor" (PIN 1234) with EC P-256 key id 01 and RSA-2048
    key id 02; returns the environment that points SoftHSM at it."""
    if not Path(SOFTHSM).exists():
        raise click.ClickException(f"{SOFTHSM} is needed: apt-get install softhsm2")
    for tool in ("softhsm2-util", "pkcs11-tool"):
        if shutil.which(tool) is None:
            raise click.ClickException(f"{tool} is needed: apt-get install softhsm2 opensc")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    env.pop("P11_KIT_SERVER_ADDRESS", None)

    def run(cmd: list[str]) -> None:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise click.ClickException(f"{' '.join(cmd[:2])} failed: {r.stderr.strip()}")

    run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--pin", PIN,
         "--so-pin", SO_PIN])
    for key_type, key_id in (("EC:prime256v1", "01"), ("rsa:2048", "02")):
        run(["pkcs11-tool", "--module", SOFTHSM, "--token-label", LABEL, "--login", "--pin", PIN,
             "--keypairgen", "--key-type", key_type, "--id", key_id, "--label", f"bench-{key_id}"])
    return env



class Target:
    """A way to reach the token: the module to load and the environment to load it in,
    and the server process behind it, if any."""

    def __init__(self, name: str, module: str, env: dict[str, str],
                 proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
        self.name, self.module, self.env, self.proc, self.log = name, module, env, proc, log

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:].strip()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_for_address(proc: subprocess.Popen[bytes], what: str, log: Path) -> str:
    """Read the server's stdout until `P11_KIT_SERVER_ADDRESS=...;` (or fail)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{what} printed no address within {START_TIMEOUT:.0f} s")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(5)
                tail = log.read_text(errors="replace")[-1500:].strip() if log.exists() else ""
                raise Unavailable(f"{what} exited with status {proc.returncode}"
                                  + (f":\n{tail}" if tail else ""))
            buf += chunk
    finally:
        sel.close()
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if "P11_KIT_SERVER_ADDRESS=" not in line:
        raise Unavailable(f"{what} printed {line!r} instead of P11_KIT_SERVER_ADDRESS=...")
    return line.split("P11_KIT_SERVER_ADDRESS=", 1)[1].split(";", 1)[0].strip()


def gateway_config(name: str, base: Path, env: dict[str, str], processes: int = 1) -> Path:
    sock = base / f"{name}.sock"
    cfg = base / f"{name}.toml"
    isolation = f'isolation = "{name}"'
    if name == "remote":
        isolation = f'isolation = "process"\nworker_command = ["p11-kit", "remote", "{SOFTHSM}"]'
    cfg.write_text(f"""\
[server]
listen = "unix:path={sock}"
state_dir = "{base / f'state-{name}'}"
log_level = "warning"
processes = {processes}

[[backend]]
name = "softhsm"
module = "{SOFTHSM}"
{isolation}
env = {{ SOFTHSM2_CONF = "{env['SOFTHSM2_CONF']}" }}

[[token]]
name = "{LABEL}"
backend = "softhsm"
select = {{ label = "{LABEL}" }}
""")
    return cfg


POOL_MEMBERS = 2


def pool_gateway_config(base: Path) -> Path:
    """A gateway whose token "anchor" is a pool of two SoftHSM tokens (each its own
    SoftHSM configuration, isolation = "process") holding the same key pairs as the
    other targets' token: EC P-256 as CKA_ID 01, RSA-2048 as CKA_ID 02 (imported)."""
    d = base / "pool"
    keys = key_material(d / "keys")
    members = []
    for i in range(POOL_MEMBERS):
        tok = softhsm_token(d / f"member{i}", f"member{i}", PIN, SO_PIN)
        import_keys(tok, keys)
        members.append(tok)
    cfg = d / "pool.toml"
    cfg.write_text(pool_config_text(d / "pool.sock", d / "state", members,
                                    ['isolation = "process"'] * len(members), LABEL))
    return cfg


def start_target(name: str, base: Path, env: dict[str, str], processes: int = 1) -> Target:
    if name == "direct":
        return Target(name, SOFTHSM, env)
    log = base / f"{name}.log"
    if name == "p11kit":
        if shutil.which("p11-kit") is None:
            raise Unavailable("p11-kit is not installed (apt-get install p11-kit)")
        cmd = ["p11-kit", "server", "-f", "-n", str(base / "p11kit.sock"), "--provider", SOFTHSM,
               f"pkcs11:token={LABEL}"]
        what = "p11-kit server"
    elif name == "pool":
        try:
            cfg = pool_gateway_config(base)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise Unavailable(f"pool members could not be made: {e}") from e
        cmd = [sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)]
        what = "p11gate serve (pool of two)"
    elif name == "soft":
        cfg = soft_gateway_config(base / "soft", LABEL, PIN, SO_PIN)
        cmd = [sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)]
        what = "p11gate serve (soft token)"
    elif name in FLOOR_TARGETS:
        cmd = [sys.executable, "-m", "p11gate.bench.floor", "--module", SOFTHSM,
               "--socket", str(base / f"{name}.sock")]
        if name == "floor-echo":
            cmd.append("--echo")
        what = f"the Python floor ({name})"
    else:
        if name == "remote" and shutil.which("p11-kit") is None:
            raise Unavailable("p11-kit is not installed (apt-get install p11-kit)")
        cmd = [sys.executable, "-m", "p11gate.cli", "serve", "--config",
               str(gateway_config(name, base, env, processes))]
        what = f"p11gate serve (isolation={name}, processes={processes})"
    if not Path(CLIENT).exists():
        raise Unavailable(f"{CLIENT} is missing (apt-get install p11-kit-modules)")
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
    try:
        address = _wait_for_address(proc, what, log)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    client_env = {k: v for k, v in env.items() if k != "SOFTHSM2_CONF"}
    return Target(name, CLIENT, {**client_env, "P11_KIT_SERVER_ADDRESS": address}, proc, log)


@contextmanager
def running(name: str, base: Path, env: dict[str, str], processes: int = 1
            ) -> Iterator[Target]:
    t = start_target(name, base, env, processes)
    try:
        yield t
    finally:
        t.stop()

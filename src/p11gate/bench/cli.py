"""`p11gate bench`: in one run, the same PKCS#11 operations against SoftHSMv2 loaded
directly, through `p11-kit server`, and through p11gate (process isolation, in-process,
and a pool of two tokens), driven by a native load generator (loadgen.c, compiled on
first use). Reports per cell throughput, latency and the server-side CPU time per
operation (sampled from /proc over the measured window only), the ratios of p11gate to
p11-kit server (and of the pool to the plain token), and PASS/FAIL against the targets.
See docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import click
from click.core import ParameterSource

from .cpu import Sample, sample, used
from .floor_report import FLOOR_TARGETS, floor_ratios, floor_report
from .tokens import import_keys, key_material, pool_config_text, soft_gateway_config, softhsm_token

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
OPS = ("random", "ecsign", "rsasign", "attrs", "find")
QUICK_OPS = ("random", "ecsign")  # --quick: RPC overhead alone, and a signature
TARGETS = ("direct", "p11kit", "process", "none", "pool", "soft")
# opt-in (--targets): process isolation with stock `p11-kit remote` as the worker, to
# weigh it against `p11gate worker` (it has no deadlines of its own and no native
# parameter checks, so it is not the default worker; see docs/benchmarks.md); and the
# Python floor (bench/floor.py): the least server p11gate's codec allows, module called
# in-line, and the same answering C_GenerateRandom without the module (floor-echo)
EXTRA_TARGETS = ("remote", *FLOOR_TARGETS)
GATEWAYS = ("process", "none")
RATIOED = (*GATEWAYS, "pool", "soft")  # rows that get ratios to p11-kit server's
CONNECTIONS = ("shared", "separate")
LABEL, PIN, SO_PIN = "anchor", "1234", "5678"
# issue targets: added latency at most this multiple of p11-kit server's (1 thread, p50)
LATENCY_LIMIT = {"none": 1.5, "process": 2.0}
# ... server-side CPU time per operation at most this multiple of p11-kit server's
CPU_LIMIT = {"none": 1.5, "process": 2.0}
# ... a pool of two members at most this multiple of the plain (process) token's CPU/op
POOL_CPU_LIMIT = 1.2
# ... throughput with N threads on one connection at least this multiple of p11-kit
# server's, and with N connections at least p11-kit server's
THROUGHPUT_LIMIT = {"throughput-shared": 1.5, "throughput-separate": 1.0}
START_TIMEOUT = 30.0

DESCRIPTIONS = {
    "direct": "SoftHSMv2 loaded into the load generator",
    "p11kit": "p11-kit server --provider libsofthsm2.so, via p11-kit-client.so",
    "process": 'p11gate, isolation = "process" (module in a worker process)',
    "none": 'p11gate, isolation = "none" (module in the gateway, thread pool)',
    "pool": 'p11gate, a pool of two SoftHSM tokens (members isolation = "process")',
    "soft": "p11gate, the built-in soft token (SQLite file, crypto by `cryptography`)",
    "remote": 'p11gate, isolation = "process", worker_command = p11-kit remote',
    "floor": "least Python server on p11gate's codec, module in-line on the loop (floor)",
    "floor-echo": "the floor, C_GenerateRandom from os.urandom (asyncio + codec only)",
}
# whose CPU time is the row's cpu_per_op_us
CPU_OF = {"direct": "load generator (module in-process: reference)",
          "p11kit": "p11-kit server and its children",
          "process": "gateway and its worker", "none": "gateway",
          "pool": "gateway and its two workers", "soft": "gateway",
          "remote": "gateway and p11-kit remote", "floor": "floor server",
          "floor-echo": "floor server (echo)"}


@dataclass
class Result:
    target: str
    op: str
    threads: int  # client threads in total
    connections: int  # 1: all threads in one process on one connection; else one each
    ops_per_s: float
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    calls: int
    errors: int
    first_error: str
    tool: str = "loadgen"
    # CPU time (user + system) over the measured window, per operation completed in it:
    # of the serving processes (for "direct": of the load generator, which holds the
    # module), and of the load generator (the client side) for every target
    cpu_per_op_us: float | None = None
    client_cpu_per_op_us: float | None = None
    cpu_of: str = ""
    completed: int = 0  # operations completed inside the window
    cpu_window_s: float = 0.0  # time between the two CPU samples
    # filled in for the p11gate targets
    added_latency_ratio: float | None = None
    throughput_ratio: float | None = None
    cpu_ratio: float | None = None  # cpu_per_op_us / p11-kit server's, same cell
    pool_cpu_ratio: float | None = None  # pool rows: cpu_per_op_us / process target's
    floor_ratio: float | None = None  # cpu_per_op_us / the floor target's, same cell


@dataclass
class Check:
    target: str
    criterion: str  # "latency" | "throughput-shared" | "throughput-separate"
    op: str
    value: float
    limit: float
    met: bool
    what: str = ""


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    yardstick: list[Result] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed_cells: list[str] = field(default_factory=list)


class Unavailable(Exception):
    """A target could not be started or measured; the message says why."""


# ---------------------------------------------------------------------------- building


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p11gate"


def compile_c(src: bytes, stem: str) -> Path:
    """Compile a single C file (cached by content hash) and return the executable. Built
    as the native executor is (backends/native/build.py): a private cache, a cached
    binary run only when nobody else could have written it, a compiler that sees only
    PATH and TMPDIR."""
    # imported here: the native package loads cffi, which every p11gate command would
    # otherwise pay for at start (this module is imported to register `bench`)
    from ..backends.native.build import BuildError, CompileFailed, NoCompiler, build

    try:
        return build(src, cache_dir(), f"{stem}-{hashlib.sha256(src).hexdigest()[:12]}", stem,
                     ["-O2", "-pthread", "-I/usr/include/p11-kit-1"], ["-ldl"])
    except NoCompiler:
        raise click.ClickException(
            "a C compiler is needed: apt-get install gcc libp11-kit-dev") from None
    except CompileFailed as e:
        hint = ""
        if "pkcs11.h" in e.stderr:
            hint = "\n(the PKCS#11 header is missing: apt-get install libp11-kit-dev)"
        raise click.ClickException(f"compiling {stem} failed:\n{e.stderr}{hint}") from None
    except BuildError as e:  # a cache another user could write to
        raise click.ClickException(str(e)) from None


def loadgen_binary() -> Path:
    return compile_c(resources.files("p11gate.bench").joinpath("loadgen.c").read_bytes(),
                     "loadgen")


# ---------------------------------------------------------------------------- the token


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


# ---------------------------------------------------------------------------- targets


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


# ---------------------------------------------------------------------------- measuring


def parse_line(line: str) -> dict[str, str]:
    """`k=v k=v ...` -> dict; raises ValueError on anything else."""
    fields = dict(kv.split("=", 1) for kv in line.split())
    for key in ("ops_per_s", "p50_us", "p99_us", "errors"):
        if key not in fields:
            raise ValueError(f"no {key} in {line!r}")
    return fields


def _cpu_per_op(before: Sample, after: Sample, pid: int, done: int) -> float | None:
    cpu = used(before, after, pid)
    return None if cpu is None or done <= 0 else cpu / done * 1e6


def measure(exe: Path, t: Target, op: str, threads: int, connections: int, seconds: float,
            warmup: float) -> Result:
    """One cell. The load generator marks its measured window on stdout; the CPU time of
    the server's process tree and of the load generator's is sampled right at both
    marks, so warm-up and set-up are not counted."""
    per_proc = threads // connections
    cmd = [str(exe), "-p", str(connections), "-t", str(per_proc), "-d", str(seconds),
           "-w", str(warmup), "-P", PIN, "-l", LABEL, "-H", t.module, op]
    limit = time.monotonic() + seconds + warmup + 120
    samples: dict[str, tuple[float, Sample]] = {}
    lines: list[str] = []
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=t.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None and proc.stdin is not None
        roots = [proc.pid] + ([t.proc.pid] if t.proc is not None else [])
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            buf = b""
            while True:
                left = limit - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"{t.name} {op}: load generator timed out")
                if not sel.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode(errors="replace").strip()
                    if line.startswith("window="):
                        samples[line[7:]] = (time.monotonic(), sample(roots))
                        if line == "window=end":  # sampled: the load may finish (-H)
                            proc.stdin.close()
                    elif line:
                        lines.append(line)
            proc.wait(max(1.0, limit - time.monotonic()))
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            sel.close()
            proc.stdout.close()
            if not proc.stdin.closed:
                proc.stdin.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise Unavailable(f"{t.name} {op} ({threads} threads, {connections} connection(s)): "
                          f"{stderr or f'exit status {proc.returncode}'}")
    try:
        f = parse_line(lines[-1])
    except (IndexError, ValueError) as e:
        raise Unavailable(f"{t.name} {op}: unparseable output {lines!r}") from e
    r = Result(t.name, op, threads, connections, float(f["ops_per_s"]), float(f["p50_us"]),
               float(f["p99_us"]), float(f.get("mean_us", 0)), float(f.get("max_us", 0)),
               int(f.get("calls", 0)), int(f["errors"]), f.get("first_error", "0x0"))
    r.completed = int(f.get("completed", round(r.ops_per_s * seconds)))
    r.cpu_of = CPU_OF[t.name]
    if "start" in samples and "end" in samples:
        (t0, before), (t1, after) = samples["start"], samples["end"]
        r.cpu_window_s = round(t1 - t0, 4)
        server = t.proc.pid if t.proc is not None else proc.pid
        r.cpu_per_op_us = _cpu_per_op(before, after, server, r.completed)
        r.client_cpu_per_op_us = _cpu_per_op(before, after, proc.pid, r.completed)
    return r


def median_of(runs: list[Result]) -> Result:
    """One row for repeated runs of a cell: the median of each measure, summed counts."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float]) -> float:
        v = sorted(values)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    def med_opt(values: list[float | None]) -> float | None:
        v = [x for x in values if x is not None]
        return med(v) if v else None

    first = runs[0]
    errs = [r.first_error for r in runs if r.errors]
    out = Result(first.target, first.op, first.threads, first.connections,
                 med([r.ops_per_s for r in runs]), med([r.p50_us for r in runs]),
                 med([r.p99_us for r in runs]), med([r.mean_us for r in runs]),
                 max(r.max_us for r in runs), sum(r.calls for r in runs),
                 sum(r.errors for r in runs), errs[0] if errs else "0x0")
    out.cpu_per_op_us = med_opt([r.cpu_per_op_us for r in runs])
    out.client_cpu_per_op_us = med_opt([r.client_cpu_per_op_us for r in runs])
    out.cpu_of = first.cpu_of
    out.completed = sum(r.completed for r in runs)
    out.cpu_window_s = med([r.cpu_window_s for r in runs])
    return out


def cpu_busy(sample: float = 1.0) -> float | None:
    """How busy the CPUs are right now: the fraction of all CPU time (0..1) that was not
    idle over `sample` seconds, from /proc/stat; None where it cannot be read. (The load
    average would do, but it decays over minutes and so mostly shows the previous run.)"""

    def times() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = times()
        time.sleep(sample)
        t1, i1 = times()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


def load_average() -> float | None:
    """The 1-minute load average, or None where it cannot be read."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


BUSY = 0.25  # warn when more than this fraction of the CPUs is in use before the run


def yardstick(exe: Path, t: Target, op: str, threads: int, seconds: float) -> Result:
    """The shared neutral p11bench, same op, all threads on one connection."""
    key_id = "02" if op == "rsasign" else "01"
    r = subprocess.run([str(exe), t.module, op, str(threads), str(seconds), PIN, key_id, LABEL],
                       env=t.env, capture_output=True, text=True, timeout=seconds + 120)
    try:
        f = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return Result(t.name, op, threads, 1, float(f["ops_per_s"]), float(f["p50_us"]),
                      float(f["p99_us"]), 0.0, 0.0, 0, int(f["errors"]), "", tool="p11bench")
    except (KeyError, ValueError) as e:
        raise Unavailable(f"p11bench {t.name} {op}: {r.stderr.strip() or r.stdout!r}") from e


def shapes(thread_counts: list[int], connections: list[str]) -> list[tuple[int, int]]:
    """(threads, connections) cells: 1 thread is one cell; N > 1 threads is measured as N
    threads on one connection ("shared") and/or N processes with one connection each
    ("separate")."""
    out: list[tuple[int, int]] = []
    for n in thread_counts:
        cells = [(1, 1)] if n == 1 else [(n, 1) if c == "shared" else (n, n)
                                         for c in connections]
        out.extend(c for c in cells if c not in out)
    return out


# ---------------------------------------------------------------------------- analysis


def shape_name(r: Result) -> str:
    if r.threads == 1:
        return "1 thread"
    if r.connections == 1:
        return f"{r.threads} threads on 1 connection"
    return f"{r.threads} connections"


def analyse(results: list[Result]) -> list[Check]:
    """Fill in the ratios of the rows and return the checks against the targets."""
    by = {(r.target, r.op, r.threads, r.connections): r for r in results}
    floor_ratios(results)
    checks: list[Check] = []
    for r in results:
        cell = (r.op, r.threads, r.connections)
        k = by.get(("p11kit", *cell))
        if r.target != "p11kit" and k and k.cpu_per_op_us and r.cpu_per_op_us is not None:
            r.cpu_ratio = r.cpu_per_op_us / k.cpu_per_op_us
            if r.target in CPU_LIMIT:
                limit = CPU_LIMIT[r.target]
                checks.append(Check(r.target, "cpu", f"{r.op}/{r.threads}x{r.connections}",
                                    r.cpu_ratio, limit, r.cpu_ratio <= limit,
                                    f"{r.target} {r.op} {shape_name(r)}: server CPU per op "
                                    f"vs p11-kit server"))
        if r.target not in RATIOED:
            continue
        if r.target == "pool":
            plain = by.get(("process", *cell))
            if plain and plain.cpu_per_op_us and r.cpu_per_op_us is not None:
                v = r.pool_cpu_ratio = r.cpu_per_op_us / plain.cpu_per_op_us
                checks.append(Check("pool", "pool-cpu", f"{r.op}/{r.threads}x{r.connections}",
                                    v, POOL_CPU_LIMIT, v <= POOL_CPU_LIMIT,
                                    f"pool {r.op} {shape_name(r)}: server CPU per op vs "
                                    f"the plain token (process)"))
        d = by.get(("direct", r.op, 1, 1))
        k1 = by.get(("p11kit", r.op, 1, 1))
        if r.threads == 1 and d and k1 and k1.p50_us > d.p50_us:
            v = (r.p50_us - d.p50_us) / (k1.p50_us - d.p50_us)
            r.added_latency_ratio = v
            if r.target in LATENCY_LIMIT:
                limit = LATENCY_LIMIT[r.target]
                checks.append(Check(r.target, "latency", r.op, v, limit, v <= limit,
                                    f"{r.target} {r.op}: added latency vs p11-kit server"))
        if k and k.ops_per_s > 0:
            r.throughput_ratio = r.ops_per_s / k.ops_per_s
            if r.threads > 1 and r.target in GATEWAYS:
                crit = "throughput-shared" if r.connections == 1 else "throughput-separate"
                v = r.throughput_ratio
                checks.append(Check(r.target, crit, r.op, v, THROUGHPUT_LIMIT[crit],
                                    v >= THROUGHPUT_LIMIT[crit],
                                    f"{r.target} {r.op}: {shape_name(r)} throughput vs "
                                    f"p11-kit server"))
    return checks


CRITERIA = {
    "cpu": "server CPU per op vs p11-kit server",
    "latency": "added latency, 1 thread, p50",
    "throughput-shared": "throughput, N threads on 1 connection",
    "throughput-separate": "throughput, N connections (processes)",
    "pool-cpu": "pool server CPU per op vs plain token",
}
AT_MOST = ("cpu", "latency", "pool-cpu")  # the others are "at least"


def summary(checks: list[Check]) -> list[tuple[str, str, float, str, float, bool, str]]:
    """Per target and criterion: (target, criterion, worst value, worst op, limit, met,
    per-op detail)."""
    out = []
    for target in RATIOED:
        for crit in CRITERIA:
            cs = [c for c in checks if c.target == target and c.criterion == crit]
            if not cs:
                continue
            worst = max(cs, key=lambda c: c.value) if crit in AT_MOST else \
                min(cs, key=lambda c: c.value)
            detail = " ".join(f"{c.op}={c.value:.2f}" for c in cs)
            out.append((target, CRITERIA[crit], worst.value, worst.op, worst.limit,
                        all(c.met for c in cs), detail))
    return out


# ---------------------------------------------------------------------------- output


def fmt_ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


HEADER = (f"{'target':8} {'op':8} {'thr':>3} {'conn':>4} {'ops/s':>10} {'p50 µs':>9} "
          f"{'p99 µs':>9} {'errors':>6} {'cpu µs':>8} {'cli µs':>7} {'cpu×':>6} {'+lat×':>7} "
          f"{'thr×':>6} {'pool×':>6}")


def fmt_us(v: float | None, mark: str = "") -> str:
    return "n/a" if v is None else f"{v:.1f}{mark}"


def row(r: Result) -> str:
    lat = fmt_ratio(r.added_latency_ratio)
    thr = fmt_ratio(r.throughput_ratio) if r.threads > 1 else ""
    cpu = fmt_us(r.cpu_per_op_us, "*" if r.target == "direct" else "")
    return (f"{r.target:8} {r.op:8} {r.threads:3} {r.connections:4} {r.ops_per_s:10.0f} "
            f"{r.p50_us:9.1f} {r.p99_us:9.1f} {r.errors:6} {cpu:>8} "
            f"{fmt_us(r.client_cpu_per_op_us):>7} {fmt_ratio(r.cpu_ratio):>6} {lat:>7} "
            f"{thr:>6} {fmt_ratio(r.pool_cpu_ratio):>6}").rstrip()


CPU_NOTE = ("cpu µs: user+system CPU of the serving processes (gateway and workers; p11-kit "
            "server and children) over the measured window, per op completed in it; "
            "* direct: the load generator's own CPU (the module runs in it), as the "
            "reference. cli µs: the load generator's CPU per op. cpu×: cpu µs / p11-kit "
            "server's, same cell. pool×: pool cpu µs / process target's, same cell.")


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    idle = cpuidle()
    return f"{os.cpu_count()} CPUs{', ' + cpu if cpu else ''}, {platform.system()} " \
           f"{platform.release()}, Python {platform.python_version()}" \
           f"{', cpuidle ' + idle if idle else ''}"


def cpuidle() -> str:
    """The idle driver, and on a VM guest its halt polling: an idle vCPU that halts at
    once makes every wake-up an exit to the host, which moves the gateway's figures more
    than p11-kit server's (docs/benchmarks.md, "Where the in-process hop goes")."""
    base = Path("/sys/devices/system/cpu/cpuidle")
    try:
        driver = (base / "current_driver").read_text().strip()
    except OSError:
        return ""
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    with contextlib.suppress(OSError):
        return f"{driver} (guest_halt_poll_ns={poll.read_text().strip()})"
    return driver


def versions() -> dict[str, str]:
    out = {}
    for name, cmd in (("softhsm2", ["softhsm2-util", "--version"]),
                      ("p11-kit", ["pkg-config", "--modversion", "p11-kit-1"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out[name] = (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return out


def report(run: Run, checks: list[Check], context: str) -> None:
    click.echo(f"# {context}")
    click.echo(HEADER)
    for r in run.results:
        click.echo(row(r))
    click.echo(CPU_NOTE)
    if run.yardstick:
        click.echo("\nyardstick: p11bench (shared tool), same cells, all threads on 1 connection")
        click.echo(f"{'target':8} {'op':8} {'thr':>3} {'ops/s':>10} {'p50 µs':>9} {'p99 µs':>9} "
                   f"{'errors':>6}  loadgen ops/s")
        mine = {(r.target, r.op, r.threads, r.connections): r for r in run.results}
        for y in run.yardstick:
            m = mine.get((y.target, y.op, y.threads, 1))
            click.echo(f"{y.target:8} {y.op:8} {y.threads:3} {y.ops_per_s:10.0f} "
                       f"{y.p50_us:9.1f} {y.p99_us:9.1f} {y.errors:6}  "
                       f"{m.ops_per_s if m else float('nan'):.0f}")
    for line in floor_report(run.results, CPU_LIMIT):
        click.echo(line)
    for name, why in run.skipped.items():
        click.echo(f"\nSKIPPED {name}: {why}")
    for cell in run.failed_cells:
        click.echo(f"FAILED {cell}")
    rows = summary(checks)
    if rows:
        click.echo("\ntargets (p11gate vs p11-kit server, pool vs plain token; worst cell "
                   "shown):")
        at_most = {CRITERIA[c] for c in AT_MOST}
        for target, crit, worst, op, limit, met, detail in rows:
            sign = "≤" if crit in at_most else "≥"
            click.echo(f"{'PASS' if met else 'FAIL'} {target:8} {crit:40} {worst:6.2f}× "
                       f"({op}; target {sign} {limit}×)  [{detail}]")
    errors = sum(r.errors for r in run.results)
    if errors:
        click.echo(f"\nWARNING: {errors} calls failed; see first_error in the JSON output")


# ---------------------------------------------------------------------------- command


def split_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise click.BadParameter(f"unknown {what}: {', '.join(bad) or '(none)'}; "
                                 f"choose from {', '.join(allowed)}")
    return items


@click.command()
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="measured duration of each cell")
@click.option("--warmup", type=float, default=0.3, show_default=True,
              help="unmeasured calls before each cell's measurement")
@click.option("--quick", is_flag=True,
              help=f"1 s cells, 0.1 s warm-up, ops {','.join(QUICK_OPS)} (unless given "
                   "explicitly)")
@click.option("--ops", default=",".join(OPS), show_default=True,
              help="operations, comma separated")
@click.option("--targets", default=",".join(TARGETS), show_default=True,
              help="targets, comma separated")
@click.option("--threads", "threads_opt", default="1,8", show_default=True,
              help="client thread counts, comma separated")
@click.option("--connections", "connections_opt", default="shared,separate",
              show_default=True,
              help="for N > 1 threads: 'shared' = N threads in one process on one "
                   "connection; 'separate' = N processes, one connection each")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="run each cell this many times and report the median of each measure")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="write all results to this file")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="[server] processes of the p11gate targets (gateway processes)")
@click.option("--yardstick", "yardstick_src", type=click.Path(exists=True, dir_okay=False),
              default=None, help="also run the cells through this p11bench.c (shared-"
                                 "connection cells only), as a check on the load generator")
def bench(seconds: float, warmup: float, quick: bool, ops: str, targets: str, threads_opt: str,
          connections_opt: str, repeat: int, json_path: str | None, processes: int,
          yardstick_src: str | None) -> None:
    """Benchmark SoftHSMv2 directly, through p11-kit server and through p11gate.

    Creates a throw-away SoftHSM token, then measures each operation with 1 and N client
    threads against each target, and prints a table, the ratios of p11gate to p11-kit
    server, and PASS/FAIL against the targets: server-side CPU per op and added latency
    ≤ 1.5× p11-kit server's in-process, ≤ 2× isolated; 8 threads on one connection
    ≥ 1.5× p11-kit server's throughput (N connections ≥ 1×); a pool of two ≤ 1.2× the
    plain token's CPU per op.
    """
    if quick:  # shorter and fewer cells, but what is given explicitly wins
        ctx = click.get_current_context()

        def default(name: str) -> bool:
            return ctx.get_parameter_source(name) is ParameterSource.DEFAULT

        if default("seconds"):
            seconds = 1.0
        if default("warmup"):
            warmup = 0.1
        if default("ops"):
            ops = ",".join(QUICK_OPS)
    if seconds <= 0 or warmup < 0:
        raise click.BadParameter("--seconds must be > 0 and --warmup ≥ 0")
    op_list = split_list(ops, OPS, "op")
    target_list = split_list(targets, (*TARGETS, *EXTRA_TARGETS), "target")
    conn_list = split_list(connections_opt, CONNECTIONS, "connections mode")
    try:
        thread_list = [int(x) for x in threads_opt.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"--threads: {e}") from e
    if not thread_list or any(not 1 <= n <= 256 for n in thread_list):
        raise click.BadParameter("--threads: numbers from 1 to 256")
    cells = shapes(thread_list, conn_list)

    exe = loadgen_binary()
    p11bench = None
    if yardstick_src:
        p11bench = compile_c(Path(yardstick_src).read_bytes(), "p11bench")
    run = Run()
    started = time.time()
    load_before = load_average()
    busy_before = cpu_busy()
    cpus = os.cpu_count() or 1
    busy = busy_before is not None and busy_before > BUSY
    if busy:
        click.echo(f"WARNING: this machine is busy ({busy_before:.0%} of {cpus} CPUs in use "
                   "before the run): the numbers will be noisy", err=True)
    total = len(target_list) * len(op_list) * len(cells)
    done = 0
    with tempfile.TemporaryDirectory(prefix="p11gate-bench-") as tmp:
        base = Path(tmp)
        env = make_token(base)
        for name in target_list:
            try:
                with running(name, base, env, processes) as t:
                    click.echo(f"# {name}: {DESCRIPTIONS[name]}", err=True)
                    for op in op_list:
                        for threads, conns in cells:
                            done += 1
                            if not t.alive():
                                raise Unavailable(f"{name} stopped during the run:\n"
                                                  f"{t.log_tail()}")
                            try:
                                r = median_of([measure(exe, t, op, threads, conns, seconds,
                                                       warmup) for _ in range(repeat)])
                            except Unavailable as e:
                                if not t.alive():
                                    raise
                                run.failed_cells.append(str(e))
                                click.echo(f"FAILED {e}", err=True)
                                continue
                            run.results.append(r)
                            click.echo(f"[{done}/{total}] " + row(r), err=True)
                            if p11bench is not None and conns == 1:
                                try:
                                    run.yardstick.append(
                                        yardstick(p11bench, t, op, threads, seconds))
                                except Unavailable as e:
                                    click.echo(f"yardstick: {e}", err=True)
            except Unavailable as e:
                run.skipped[name] = str(e)
                click.echo(f"SKIPPING {name}: {e}", err=True)
    checks = analyse(run.results)
    vers = versions()
    context = (f"{time.strftime('%Y-%m-%d')}, {machine()}, "
               + ", ".join(f"{k} {v}" for k, v in vers.items())
               + f"; {seconds:g} s cells after {warmup:g} s warm-up"
               + (f", median of {repeat}" if repeat > 1 else ""))
    report(run, checks, context)
    if busy:
        click.echo(f"\nWARNING: the machine was busy when the run started ({busy_before:.0%} "
                   f"of {cpus} CPUs in use): the numbers are noisy")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(), "cpus": os.cpu_count(), "versions": vers,
            "seconds": seconds, "warmup": warmup, "repeat": repeat,
            "load_average_before": load_before, "cpu_busy_before": busy_before,
            "duration_s": round(time.time() - started, 1),
            "results": [asdict(r) for r in run.results],
            "yardstick": [asdict(r) for r in run.yardstick],
            "checks": [asdict(c) for c in checks],
            "summary": [{"target": s[0], "criterion": s[1], "worst": s[2], "worst_op": s[3],
                         "limit": s[4], "met": s[5]} for s in summary(checks)],
            "cpu_per_op_us": {f"{r.target}/{r.op}/{r.threads}x{r.connections}": {
                "cpu_per_op_us": r.cpu_per_op_us, "cpu_of": r.cpu_of,
                "client_cpu_per_op_us": r.client_cpu_per_op_us,
                "ratio_vs_p11kit": r.cpu_ratio, "ratio_vs_process": r.pool_cpu_ratio,
                "ratio_vs_floor": r.floor_ratio,
                "p50_us": r.p50_us, "ops_per_s": r.ops_per_s} for r in run.results},
            "skipped": run.skipped, "failed_cells": run.failed_cells,
        }, indent=1) + "\n")
    if not run.results:
        raise click.ClickException("nothing was measured")

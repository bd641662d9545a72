"""`p11gate bench`: one run measures the same operations directly against SoftHSMv2,
through `p11-kit server`, and through p11gate (process isolation and in-process), with a
native load generator (loadgen.c, compiled on first use), and reports p11gate's added
latency as a ratio of p11-kit server's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import click

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
OPS = ("random", "ecsign", "rsasign", "attrs", "find")
TARGETS = ("direct", "p11kit", "process", "none")
LABEL, PIN = "anchor", "1234"


@dataclass
class Result:
    target: str
    op: str
    threads: int
    ops_per_s: float
    p50_us: float
    p99_us: float
    errors: int


def loadgen_binary() -> Path:
    src = resources.files("p11gate.bench").joinpath("loadgen.c").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p11gate"
    exe = cache / f"loadgen-{hashlib.sha256(src).hexdigest()[:12]}"
    if exe.exists():
        return exe
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise click.ClickException("a C compiler is needed: apt-get install gcc libp11-kit-dev")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "loadgen.c"
        c.write_bytes(src)
        r = subprocess.run([cc, "-O2", "-pthread", "-I/usr/include/p11-kit-1", "-o",
                            str(exe), str(c), "-ldl"], capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"compiling loadgen failed (libp11-kit-dev?):\n{r.stderr}")
    return exe


def make_token(base: Path) -> dict[str, str]:
    for tool in ("softhsm2-util", "pkcs11-tool"):
        if shutil.which(tool) is None:
            raise click.ClickException(f"{tool} is needed: apt-get install softhsm2 opensc")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--pin", PIN,
                    "--so-pin", "5678"], env=env, check=True, capture_output=True)
    for kt, kid in (("EC:prime256v1", "01"), ("rsa:2048", "02")):
        subprocess.run(["pkcs11-tool", "--module", SOFTHSM, "--token-label", LABEL, "--login",
                        "--pin", PIN, "--keypairgen", "--key-type", kt, "--id", kid,
                        "--label", f"bench-{kid}"], env=env, check=True, capture_output=True)
    return env


class Target:
    """A way to reach the token: the module to load and the environment to load it in."""

    def __init__(self, name: str, module: str, env: dict[str, str],
                 proc: subprocess.Popen[bytes] | None = None) -> None:
        self.name, self.module, self.env, self.proc = name, module, env, proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_target(name: str, base: Path, env: dict[str, str]) -> Target:
    if name == "direct":
        return Target(name, SOFTHSM, env)
    sock = base / f"{name}.sock"
    if name == "p11kit":
        proc = subprocess.Popen(["p11-kit", "server", "-f", "-n", str(sock), "--provider",
                                 SOFTHSM, f"pkcs11:token={LABEL}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        return Target(name, CLIENT, {**env, "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"},
                      proc)
    cfg = base / f"{name}.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sock}"
state_dir = "{base / 'state'}"
log_level = "warning"
[[backend]]
name = "softhsm"
module = "{SOFTHSM}"
isolation = "{name}"
env = {{ SOFTHSM2_CONF = "{env['SOFTHSM2_CONF']}" }}
[[token]]
name = "{LABEL}"
backend = "softhsm"
select = {{ label = "{LABEL}" }}
""")
    proc = subprocess.Popen([sys.executable, "-m", "p11gate.cli", "serve", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "P11_KIT_SERVER_ADDRESS=" not in line:
        proc.kill()
        raise click.ClickException(f"p11gate ({name}) did not start")
    address = line.split("=", 1)[1].split(";", 1)[0]
    return Target(name, CLIENT, {**env, "P11_KIT_SERVER_ADDRESS": address}, proc)


def measure(exe: Path, t: Target, op: str, threads: int, seconds: float) -> Result:
    r = subprocess.run([str(exe), t.module, op, str(threads), str(seconds), PIN,
                        LABEL if t.name != "p11kit" else "-"],
                       env=t.env, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise click.ClickException(f"{t.name} {op}: {r.stderr.strip()}")
    f = dict(kv.split("=") for kv in r.stdout.split())
    return Result(t.name, op, threads, float(f["ops_per_s"]), float(f["p50_us"]),
                  float(f["p99_us"]), int(f["errors"]))


def ratios(results: list[Result]) -> list[tuple[str, float, float, bool]]:
    """(what, value, target, met) for the issue's targets."""
    by = {(r.target, r.op, r.threads): r for r in results}
    out = []
    for target, limit in (("none", 1.5), ("process", 3.0)):
        for r in results:
            if r.target != target or r.threads != 1:
                continue
            d, k = by.get(("direct", r.op, 1)), by.get(("p11kit", r.op, 1))
            if d is None or k is None or k.p50_us <= d.p50_us:
                continue
            v = (r.p50_us - d.p50_us) / (k.p50_us - d.p50_us)
            out.append((f"{target} {r.op}: added latency vs p11-kit server", v, limit,
                        v <= limit))
    for r in results:
        k = by.get(("p11kit", r.op, r.threads))
        if r.target in ("none", "process") and r.threads > 1 and k is not None:
            v = r.ops_per_s / k.ops_per_s
            out.append((f"{r.target} {r.op}: {r.threads}-thread throughput vs p11-kit server",
                        v, 1.0, v >= 1.0))
    return out


@click.command()
@click.option("--seconds", default=2.0, show_default=True, help="duration of each cell")
@click.option("--quick", is_flag=True, help="1 s cells")
@click.option("--ops", default=",".join(OPS), show_default=True)
@click.option("--targets", default=",".join(TARGETS), show_default=True)
@click.option("--threads", "threads_opt", default="1,8", show_default=True,
              help="client threads, all on one connection (one process, like a real app)")
@click.option("--json", "json_path", default=None, help="write all results to this file")
def bench(seconds: float, quick: bool, ops: str, targets: str, threads_opt: str,
          json_path: str | None) -> None:
    """Benchmark SoftHSMv2 directly, through p11-kit server and through p11gate."""
    if quick:
        seconds = 1.0
    op_list = [o for o in ops.split(",") if o]
    target_list = [t for t in targets.split(",") if t]
    bad = set(op_list) - set(OPS) | set(target_list) - set(TARGETS)
    if bad:
        raise click.BadParameter(f"unknown: {', '.join(sorted(bad))}")
    thread_list = [int(x) for x in threads_opt.split(",")]
    exe = loadgen_binary()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="p11gate-bench-") as tmp:
        base = Path(tmp)
        env = make_token(base)
        for name in target_list:
            t = start_target(name, base, env)
            try:
                for op in op_list:
                    for n in thread_list:
                        r = measure(exe, t, op, n, seconds)
                        results.append(r)
                        click.echo(f"{r.target:8} {r.op:8} {r.threads:3} {r.ops_per_s:11.0f} "
                                   f"{r.p50_us:9.1f} {r.p99_us:9.1f} {r.errors:6}", err=True)
            finally:
                t.stop()
    click.echo(f"{'target':8} {'op':8} {'thr':>3} {'ops/s':>11} {'p50 µs':>9} "
               f"{'p99 µs':>9} {'errors':>6}")
    for r in results:
        click.echo(f"{r.target:8} {r.op:8} {r.threads:3} {r.ops_per_s:11.0f} {r.p50_us:9.1f} "
                   f"{r.p99_us:9.1f} {r.errors:6}")
    checks = ratios(results)
    if checks:
        click.echo("")
    for what, v, limit, met in checks:
        sign = "≤" if "latency" in what else "≥"
        click.echo(f"{'PASS' if met else 'MISS'} {what}: {v:.2f}× (target {sign} {limit}×)")
    if json_path:
        Path(json_path).write_text(json.dumps(
            {"results": [asdict(r) for r in results],
             "checks": [{"what": w, "value": v, "target": t, "met": m}
                        for w, v, t, m in checks],
             "seconds": seconds, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
            indent=1))

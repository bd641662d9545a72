"""`p11gate bench-pool`: what a pool buys when members are capacity-bound.

Each member is SoftHSM behind `p11gate.bench.hsm_sim` (one call at a time, a fixed
service time per signature), standing in for a small HSM partition. The same ECDSA
signing load (many sessions pipelined over a few connections) runs against a pool of
1 member and a pool of N; the report is each throughput and their ratio (ideal: N).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from ..codec import Attribute, Mechanism
from ..codec import constants as ck
from .rpc_client import AsyncRpcClient
from .tokens import import_keys, key_material, pool_config_text, softhsm_token

PIN = "1234"
C_GetSlotList, C_OpenSession, C_Login = 4, 10, 18
C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 26, 27, 28
C_SignInit, C_Sign = 42, 43
CKM_ECDSA = ck.CKM_ECDSA


def write_config(base: Path, members: list[dict[str, str]], service_ms: float) -> Path:
    sim = [f'worker_command = ["{sys.executable}", "-m", "p11gate.bench.hsm_sim", '
           f'"--service-ms", "{service_ms}", "{m["module"]}"]' for m in members]
    cfg = base / "p11gate.toml"
    cfg.write_text(pool_config_text(base / "gw.sock", base / "state", members, sim, "bench",
                                    "max_sessions_per_member = 8"))
    return cfg


async def _load(path: str, connections: int, sessions: int, seconds: float) -> float:
    """Signatures per second over the signing window alone (set-up not counted)."""
    clients = [await AsyncRpcClient.connect(path) for _ in range(connections)]
    work = []
    for c in clients:
        (slots,) = await c.call(C_GetSlotList, [1, 4])
        hs = [(await c.call(C_OpenSession, [slots[0], 6]))[0] for _ in range(sessions)]
        await c.call(C_Login, [hs[0], 1, PIN.encode()])
        label = b"ec1"
        await c.call(C_FindObjectsInit, [hs[0], [Attribute(0, 3, 8),
                                                 Attribute(3, label, len(label))]])
        (keys,) = await c.call(C_FindObjects, [hs[0], 4])
        await c.call(C_FindObjectsFinal, [hs[0]])
        work += [(c, h, keys[0]) for h in hs]
    done = 0
    start = time.monotonic()
    end = start + seconds

    async def signer(c: AsyncRpcClient, h: int, key: int) -> None:
        nonlocal done
        digest = bytes(32)
        while time.monotonic() < end:
            await c.call(C_SignInit, [h, Mechanism(CKM_ECDSA, None), key])
            await c.call(C_Sign, [h, digest, 256])
            done += 1

    await asyncio.gather(*(signer(*w) for w in work))
    rate = done / (time.monotonic() - start)
    for c in clients:
        await c.close()
    return rate


def run_pool(base: Path, members: list[dict[str, str]], service_ms: float,
             connections: int, sessions: int, seconds: float) -> float:
    cfg = write_config(base, members, service_ms)
    proc = subprocess.Popen([sys.executable, "-m", "p11gate.cli", "serve", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "P11_KIT_SERVER_ADDRESS=" not in line:
            raise click.ClickException(f"gateway did not start: {line!r}")
        return asyncio.run(_load(str(base / "gw.sock"), connections, sessions, seconds))
    finally:
        proc.terminate()
        proc.wait(10)


@click.command("bench-pool")
@click.option("--members", default=3, show_default=True, help="members of the larger pool")
@click.option("--service-ms", default=5.0, show_default=True,
              help="simulated service time of one signature on a member")
@click.option("--seconds", default=5.0, show_default=True, help="load per pool size")
@click.option("--connections", default=4, show_default=True)
@click.option("--sessions", default=8, show_default=True, help="sessions per connection")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def bench_pool(members: int, service_ms: float, seconds: float, connections: int,
               sessions: int, json_out: str | None) -> None:
    """Throughput of a pool of N capacity-bound members against a pool of one."""
    with tempfile.TemporaryDirectory(prefix="p11gate-bench-pool-") as tmp:
        base = Path(tmp)
        keys = key_material(base / "keys", rsa_key=False)
        toks = []
        for i in range(members):
            t = softhsm_token(base / f"member{i}", f"member{i}", PIN)
            import_keys(t, keys)
            toks.append(t)
        results: dict[str, Any] = {"service_ms": service_ms, "seconds": seconds,
                                   "sessions": connections * sessions}
        for n in (1, members):
            d = base / f"pool{n}"
            d.mkdir()
            rate = run_pool(d, toks[:n], service_ms, connections, sessions, seconds)
            results[f"ops_per_s_{n}"] = round(rate, 1)
            click.echo(f"pool of {n} member(s): {rate:8.1f} signatures/s "
                       f"(one member's capacity: {1000 / service_ms:.0f}/s)")
        ratio = results[f"ops_per_s_{members}"] / results["ops_per_s_1"]
        results["ratio"] = round(ratio, 2)
        verdict = "PASS" if ratio >= 2.5 else "MISS"
        click.echo(f"{members} members / 1 member: {ratio:.2f}x  (target >= 2.5x: {verdict})")
        if json_out:
            Path(json_out).write_text(json.dumps(results, indent=2))

"""Issue 3: a member down at start-up, 1000 client sessions over at most 4 backend
sessions per member, and the capacity benchmark (3 members vs 1)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, wait_for
from tests.pools.members import PIN, key_material, make_member, pool_config

from p11gate.admin import query
from p11gate.bench.rpc_client import AsyncRpcClient
from p11gate.codec import Attribute, Mechanism

C_GetSlotList, C_OpenSession, C_Login = 4, 10, 18
C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal = 26, 27, 28
C_SignInit, C_Sign = 42, 43


def members_status(base: Path) -> list[dict[str, Any]]:
    return list(query(str(base / "state" / "admin.sock"))["pools"][0]["members"])


def sign_once(gw: Gateway, tmp: Path) -> subprocess.CompletedProcess[str]:
    data = tmp / "data"
    data.write_bytes(b"\x01" * 32)
    return subprocess.run(
        ["pkcs11-tool", "--module", CLIENT_MODULE, "--login", "--pin", PIN, "--sign", "-m",
         "ECDSA", "--id", "01", "-i", str(data), "-o", str(tmp / "sig")],
        env=gw.client_env(), capture_output=True, text=True, timeout=60)


def test_a_member_down_at_start_up_does_not_stop_the_others(tmp_path: Path) -> None:
    keys = key_material(tmp_path / "keys")
    members = [make_member(tmp_path, i, keys) for i in range(3)]
    late_conf = tmp_path / "late" / "softhsm2.conf"  # does not exist yet: m2 cannot start
    confs = [members[0]["conf"], members[1]["conf"], str(late_conf)]
    gw = Gateway(pool_config(tmp_path, members, confs=confs, extra_pool="stats_interval = 0.5"))
    try:
        r = sign_once(gw, tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        st = members_status(tmp_path)
        assert [m["state"] for m in st] == ["up", "up", "down"]
        assert st[2]["calls"] == 0
        # the log has the figures too: the down member and why (stats every 0.5 s)
        assert wait_for(lambda: any(
            r.get("msg") == "pool stats" and r["members"]["m2"]["state"] == "down"
            for r in gw.records()), timeout=5)
        # the member's configuration appears: it joins by itself
        late_conf.parent.mkdir()
        shutil.copy(members[2]["conf"], late_conf)
        assert wait_for(lambda: members_status(tmp_path)[2]["state"] == "up", timeout=20)
        for _ in range(12):
            assert sign_once(gw, tmp_path).returncode == 0
        assert members_status(tmp_path)[2]["calls"] > 0  # and takes work
        # then every member's load
        stats = [r for r in gw.records() if r.get("msg") == "pool stats"]
        assert wait_for(lambda: any(
            r["members"]["m2"]["state"] == "up" and r["members"]["m2"]["calls"] > 0
            for r in gw.records() if r.get("msg") == "pool stats"), timeout=5)
        last = stats[-1]["members"]["m0"]
        assert {"outstanding", "latency_ms", "failovers", "sessions_leased"} <= set(last)
        assert any(r.get("msg") == "pool member up" and r.get("member") == "m2"
                   for r in gw.records())
    finally:
        gw.stop()


async def _thousand_sessions(path: str, connections: int, per: int) -> list[bytes]:
    async def one_connection() -> list[bytes]:
        c = await AsyncRpcClient.connect(path)
        (slots,) = await c.call(C_GetSlotList, [1, 4])
        hs = [(await c.call(C_OpenSession, [slots[0], 6]))[0] for _ in range(per)]
        await c.call(C_Login, [hs[0], 1, PIN.encode()])
        await c.call(C_FindObjectsInit, [hs[0], [Attribute(0, 3, 8),
                                                 Attribute(3, b"ec1", 3)]])
        (keys,) = await c.call(C_FindObjects, [hs[0], 4])
        await c.call(C_FindObjectsFinal, [hs[0]])

        async def sign(h: int) -> bytes:
            await c.call(C_SignInit, [h, Mechanism(0x1041, None), keys[0]])
            (sig,) = await c.call(C_Sign, [h, bytes(range(32)), 256])
            return bytes(sig)

        sigs = await asyncio.gather(*(sign(h) for h in hs))
        await c.close()
        return list(sigs)

    parts = await asyncio.gather(*(one_connection() for _ in range(connections)))
    return [s for p in parts for s in p]


def test_1000_client_sessions_share_at_most_4_backend_sessions_per_member(
    tmp_path: Path,
) -> None:
    keys = key_material(tmp_path / "keys", rsa_key=False)
    members = [make_member(tmp_path, i, keys) for i in range(3)]
    gw = Gateway(pool_config(tmp_path, members, max_sessions=4))
    try:
        t0 = time.monotonic()
        sigs = asyncio.run(_thousand_sessions(gw.path, 10, 100))
        elapsed = time.monotonic() - t0
        assert len(sigs) == 1000
        pub = load_der_public_key(keys["ec-pub"].read_bytes())
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        for sig in sigs:  # every one of them is a good signature
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                       int.from_bytes(sig[32:], "big"))
            pub.verify(der, bytes(range(32)), ec.ECDSA(Prehashed(hashes.SHA256())))
        st = members_status(tmp_path)
        print(f"\n1000 sessions signed in {elapsed:.1f} s; per member: "
              + json.dumps([{k: m[k] for k in ("backend", "calls", "sessions_open_max")}
                            for m in st]))
        for m in st:
            assert 1 <= m["sessions_open_max"] <= 4, st  # the control session included
            assert m["calls"] > 0
        assert query(str(tmp_path / "state" / "admin.sock"))["pools"][0][
            "logical_sessions"] >= 1  # the token's own control session remains
        # balancing is per operation: one client session's operations use every member
        before = [m["calls"] for m in members_status(tmp_path)]
        asyncio.run(_thousand_sessions(gw.path, 1, 1))
        c = RawClient(gw.path)
        c.initialize()
        (slots,) = c.call(C_GetSlotList, [1, 4])
        (h,) = c.call(C_OpenSession, [slots[0], 6])
        c.call(C_Login, [h, 1, PIN.encode()])
        c.call(C_FindObjectsInit, [h, [Attribute(0, 3, 8), Attribute(3, b"ec1", 3)]])
        (found,) = c.call(C_FindObjects, [h, 4])
        c.call(C_FindObjectsFinal, [h])
        key = next(k for k in found)
        for _ in range(30):
            c.call(C_SignInit, [h, Mechanism(0x1041, None), key])
            c.call(C_Sign, [h, bytes(32), 256])
        after = [m["calls"] for m in members_status(tmp_path)]
        # (every member takes part; how much each takes follows their measured latency,
        # which other load on the machine moves: one member took 7 of 60 calls once)
        assert all(a - b >= 2 for a, b in zip(after, before, strict=True)), (before, after)
    finally:
        gw.stop()


def test_three_capacity_bound_members_give_at_least_2_5x_one(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # 20 ms per signature (50/s per member): the members, not the gateway's CPU, are the
    # limit even on a busy shared CI machine (at 5 ms the 3-member pool needs ~1,200
    # gateway calls/s, and a loaded 2-core machine then measured 2.35x instead of ~3x)
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "bench-pool", "--seconds", "4",
                        "--service-ms", "20", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    print("\n" + r.stdout)
    res = json.loads(out.read_text())
    assert res["ops_per_s_1"] <= 1000 / res["service_ms"] * 1.05  # one member is the limit
    assert res["ratio"] >= 2.5, res

"""Random and mutated frames against a live gateway: it stays up, keeps answering other
clients, and its memory does not grow without bound."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import psutil
from tests.gateway_proc import Gateway, RawClient
from tests.robustness.test_malformed import good_client, sign_once

CAPTURES = Path(__file__).resolve().parents[1] / "vectors" / "captures"


def capture_frames() -> list[bytes]:
    frames: list[bytes] = []
    for path in sorted(CAPTURES.glob("*.hex")):
        for line in path.read_text().splitlines():
            if line.startswith("C>S ") and len(line) > 6:
                frames.append(bytes.fromhex(line[4:]))
    assert frames, f"no capture frames under {CAPTURES}"
    return frames


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and len(b) > 12:  # truncate
            del b[rng.randrange(12, len(b)) :]
        elif kind == 2 and len(b) >= 4:  # a hostile 32-bit length anywhere
            i = rng.randrange(0, len(b) - 3)
            b[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                        b"\x00\x01\x00\x00", b"\x00\x00\x00\x00"])
        elif kind == 3:  # random garbage appended
            b += rng.randbytes(rng.randrange(1, 64))
        elif kind == 4 and len(b) > 16:  # body length consistent with a mutated body
            body_len = len(b) - 12 - int.from_bytes(b[4:8], "big")
            if body_len >= 0:
                b[8:12] = body_len.to_bytes(4, "big")
        else:  # swap the call id
            if len(b) > 22:
                olen = int.from_bytes(b[4:8], "big")
                at = 12 + olen
                if at + 4 <= len(b):
                    b[at : at + 4] = rng.randrange(0, 100).to_bytes(4, "big")
    return bytes(b)


def fuzz_round(gw: Gateway, rng: random.Random, frames: list[bytes], n: int) -> None:
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(gw.path)
        try:
            s.sendall(bytes([rng.randrange(4)]))
            s.recv(1)
            # a valid C_Initialize first half of the time, to reach deeper code
            if rng.random() < 0.5:
                s.sendall(frames[0])
            for _ in range(rng.randint(1, 6)):
                if rng.random() < 0.1:
                    s.sendall(rng.randbytes(rng.randrange(1, 200)))
                else:
                    s.sendall(mutate(rng, rng.choice(frames)))
            s.settimeout(0.05)
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()


def test_fuzz_live_gateway(gateway: Gateway) -> None:
    rng = random.Random(20261122)
    frames = capture_frames()
    good, sess, key = good_client(gateway)
    proc = psutil.Process(gateway.proc.pid)
    fuzz_round(gateway, rng, frames, 150)  # warm-up: caches, first allocations
    time.sleep(0.5)
    rss_before = proc.memory_info().rss
    deadline = time.monotonic() + 20
    rounds = 0
    while time.monotonic() < deadline and rounds < 10:
        fuzz_round(gateway, rng, frames, 100)
        rounds += 1
        assert gateway.alive(), gateway.log()[-3000:]
        sign_once(good, sess, key)  # another client is still served
    time.sleep(0.5)
    rss_after = proc.memory_info().rss
    growth = rss_after - rss_before
    assert growth < 20 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB over {rounds} rounds"
    # every fuzz connection was closed and forgotten
    fresh = RawClient(gateway.path)
    fresh.initialize()
    fresh.close()
    sign_once(good, sess, key)
    good.close()

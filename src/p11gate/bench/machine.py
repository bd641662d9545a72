"""The machine a bench runs on: how busy its CPUs are before the run (a busy machine's
numbers are noisy, and the run says so), its CPU model, idle driver and halt polling,
and the versions of SoftHSM and p11-kit, for the report's and the JSON's context line.

Why a module of its own: none of this is a measurement of a target; it is read from
/proc, /sys and the tools, once per run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path


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

"""The native executor's C under ThreadSanitizer and AddressSanitizer + UBSan: a stress
harness (native_executor_stress.c) of 200,000 calls, cancellations, stop and free. A
data race, a use after free, a leak or undefined behaviour fails the run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "p11gate" / "backends" / "native" / "executor.c"
HARNESS = Path(__file__).with_name("native_executor_stress.c")


@pytest.mark.parametrize("sanitize", ["thread", "address,undefined"])
def test_executor_is_clean_under_the_sanitizers(tmp_path: Path, sanitize: str) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc is not None, "a C compiler is needed (scripts/install-deps.sh installs gcc)"
    exe = tmp_path / "stress"
    r = subprocess.run([cc, "-O1", "-g", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer",
                        "-fno-sanitize-recover=all", "-pthread", "-o", str(exe),
                        str(HARNESS), str(SOURCE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env={"TSAN_OPTIONS": "halt_on_error=1",
                              "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Sanitizer" not in run.stderr, run.stderr
    done, cancelled = (int(w) for w in run.stdout.split()[1::2])
    assert done + cancelled == 200_000 and done > 0

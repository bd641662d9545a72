"""`uv build` makes a wheel that installs with pip into a fresh virtual environment and
runs there: `p11gate --version`, the console script, and the C sources it compiles on
first use (the bench's load generator, the in-process native executor) are in the
installed package (and compile)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    assert os.path.exists(found), "uv is not installed (scripts/install-deps.sh installs it)"
    return found


def test_wheel_installs_and_ships_the_load_generator(tmp_path: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = tmp_path / "dist"
    r = subprocess.run([_uv(), "build", "--wheel", "--out-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("p11gate-*.whl")
    assert wheel.name.startswith(f"p11gate-{version}-")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # a clean environment: nothing from the repository or the test's own venv leaks in
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    r = subprocess.run([str(venv / "bin" / "p11gate"), "--version"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"p11gate, version {version}"

    probe = (
        "import importlib.resources as r, hashlib, p11gate\n"
        "src = r.files('p11gate.bench').joinpath('loadgen.c').read_bytes()\n"
        "print(p11gate.__file__)\n"
        "print(hashlib.sha256(src).hexdigest())\n"
        "from p11gate.bench.cli import loadgen_binary\n"
        "print(loadgen_binary())\n"
    )
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    where, digest, exe = r.stdout.split()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the source tree
    source = (ROOT / "src" / "p11gate" / "bench" / "loadgen.c").read_bytes()
    assert digest == hashlib.sha256(source).hexdigest()
    # compiled from the installed copy into the fresh cache
    assert Path(exe).is_relative_to(tmp_path / "cache") and os.access(exe, os.X_OK)

    # the native call executor's C source ships too, and builds from the installed copy
    probe = (
        "from p11gate.backends.native import executor\n"
        "lib = executor.load()\n"
        "print(executor.cache_dir())\n"
        "print(lib.p11x_max_args())\n"
    )
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cache, max_args = r.stdout.split()
    assert Path(cache) == tmp_path / "cache" / "p11gate" and max_args == "12"
    assert list(Path(cache).glob("p11gate-executor-*.so"))

"""`check-config` loads each configured module in a throw-away worker and reports the
loader's own error, or the module's manufacturer and version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.softhsm import make_token, requires_softhsm


def check_config(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config", str(cfg),
                           *extra], capture_output=True, text=True, timeout=120)


def config(base: Path, backends: list[tuple[str, str, str]]) -> Path:
    """(name, module, SOFTHSM2_CONF or "") per backend, one token on the first."""
    text = f'[server]\nlisten = "unix:path={base / "gw.sock"}"\nstate_dir = "{base / "st"}"\n'
    for name, module, conf in backends:
        env = f'env = {{ SOFTHSM2_CONF = "{conf}" }}\n' if conf else ""
        text += f'\n[[backend]]\nname = "{name}"\nmodule = "{module}"\n{env}'
    text += f'\n[[token]]\nname = "t"\nbackend = "{backends[0][0]}"\n'
    text += '\n[[rule]]\nname = "root"\nuid = [0]\ntokens = ["*"]\n'
    cfg = base / "p11gate.toml"
    cfg.write_text(text)
    return cfg


def test_a_program_is_not_a_module_and_the_dlopen_error_says_why(tmp_path: Path) -> None:
    r = check_config(config(tmp_path, [("bad", "/bin/true", "")]))
    assert r.returncode == 2
    line = next(x for x in r.stderr.splitlines() if "backend[0] (bad).module" in x)
    # dlopen's own words, through the worker
    assert "cannot dynamically load position-independent executable" in line, r.stderr
    assert "OK" not in r.stdout


def test_two_bad_modules_are_both_reported_in_one_run(tmp_path: Path) -> None:
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    r = check_config(config(tmp_path, [("bad", "/bin/true", ""), ("libc", libc, "")]))
    assert r.returncode == 2
    assert "backend[0] (bad).module: /bin/true: cannot be loaded" in r.stderr, r.stderr
    assert (f"backend[1] (libc).module: {libc}: cannot be loaded: '{libc}' is not a "
            "PKCS#11 module (no C_GetFunctionList)") in r.stderr, r.stderr


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    r = check_config(config(tmp_path, [("gone", "/nonexistent/vendor.so", "")]))
    assert r.returncode == 2
    assert "/nonexistent/vendor.so" in r.stderr and "does not exist" in r.stderr, r.stderr


@requires_softhsm
def test_softhsm_loads_and_shows_its_manufacturer(tmp_path: Path) -> None:
    tok = make_token(tmp_path / "hsm", keys=False)
    cfg = config(tmp_path, [("softhsm", tok["module"], tok["conf"])])
    r = check_config(cfg)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("module softhsm:"))
    assert "loaded: SoftHSM" in line and "library 2." in line, line
    assert r.stdout.rstrip().endswith("OK")
    # a module that initializes only with its configuration: C_Initialize fails
    bad = config(tmp_path, [("softhsm", tok["module"], str(tmp_path / "none.conf"))])
    r = check_config(bad)
    assert r.returncode == 2
    assert "backend[0] (softhsm).module" in r.stderr, r.stderr
    # --no-load: the same file passes the checks that do not load anything
    r = check_config(bad, "--no-load")
    assert r.returncode == 0, r.stderr
    assert "module softhsm:" not in r.stdout

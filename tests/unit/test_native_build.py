"""backends/native/build.py: the one way shipped C files are compiled into the cache, for
the native executor (its refusals are in test_native_executor.py) and the bench's load
generators (bench.cli.compile_c, which must keep its own messages and cache)."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

import click
import pytest

from p11gate.backends.native import build as native_build
from p11gate.bench.cli import compile_c, loadgen_binary

needs_cc = pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")

HELLO = b"int main(void) { return 0; }\n"


def _fake_cc(tmp_path: Path, record: Path) -> Path:
    """A "compiler" that writes its environment to ``record`` and makes an empty output
    file."""
    cc = tmp_path / "fake-cc"
    cc.write_text(f'#!/bin/sh\nenv > "{record}"\nwhile [ "$1" != "-o" ]; do shift; done\n'
                  ': > "$2"\n')
    cc.chmod(0o755)
    return cc


def test_the_compiler_sees_only_path_and_tmpdir(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "env.txt"
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path, record)))
    monkeypatch.setenv("CPATH", "/somewhere/else")  # would steer a real compiler
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = native_build.build(HELLO, tmp_path / "c", "hello-1", "hello", ["-O2"])
    assert out == tmp_path / "c" / "hello-1" and out.exists()
    env = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert "CPATH" not in env and "CC" not in env
    assert env["TMPDIR"] == str(tmp_path) and env["PATH"] == os.environ["PATH"]
    # the shell adds a few of its own; nothing else comes from the caller's environment
    assert set(env) <= {"PATH", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD"}
    assert out.stat().st_mode & 0o777 == 0o755  # whatever the umask
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700


def test_a_cached_file_is_reused_only_while_private(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    (cache / "hello-1").write_bytes(b"")
    (cache / "hello-1").chmod(0o755)
    monkeypatch.setenv("CC", "/bin/false")  # would fail: the cached file is used
    assert native_build.build(HELLO, cache, "hello-1", "hello", []) == cache / "hello-1"
    (cache / "hello-1").chmod(0o775)
    with pytest.raises(native_build.BuildError, match="writable by others"):
        native_build.build(HELLO, cache, "hello-1", "hello", [])
    (cache / "hello-1").unlink()
    os.symlink("/bin/true", cache / "hello-1")
    # a link's own mode is 0777 on Linux: refused as writable before it is named a link
    with pytest.raises(native_build.BuildError, match=r"writable by others|symbolic link"):
        native_build.build(HELLO, cache, "hello-1", "hello", [])


def test_bench_refuses_a_cache_others_can_write(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    open_dir = tmp_path / "p11gate"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(click.ClickException, match="writable by others"):
        compile_c(HELLO, "hello")


def test_bench_messages_without_a_compiler_and_on_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_build.shutil, "which", lambda _name: None)
    with pytest.raises(click.ClickException, match="a C compiler is needed"):
        compile_c(HELLO, "hello")
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(click.ClickException, match="compiling hello failed"):
        compile_c(HELLO, "hello")


@needs_cc
def test_bench_hint_when_the_pkcs11_header_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(click.ClickException, match="apt-get install libp11-kit-dev"):
        compile_c(b"#include <no-such-dir/pkcs11.h>\n" + HELLO, "hello")


@needs_cc
def test_bench_builds_the_load_generator_into_its_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/include/p11-kit-1").is_dir():
        pytest.skip("needs the p11-kit headers")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("P11GATE_CACHE_DIR", str(tmp_path / "not-the-bench's"))
    exe = loadgen_binary()
    src = resources.files("p11gate.bench").joinpath("loadgen.c").read_bytes()
    assert exe.parent == tmp_path / "p11gate" and exe.name.startswith("loadgen-")
    assert os.access(exe, os.X_OK)
    monkeypatch.setenv("CC", "/bin/false")  # cached: not compiled again
    assert compile_c(src, "loadgen") == exe

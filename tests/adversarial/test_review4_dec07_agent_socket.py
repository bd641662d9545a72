"""Fourth review (agent): the agent's local socket, which carries the applications' PINs.

`p11gate agent` used to unlink whatever was at its --listen path and bind there, in any
directory: in a directory every user may write (no sticky bit) another user could put
their own socket in the agent's place and collect the PINs of every application that
connects; a second agent (or a typo naming the gateway's socket) silently took a live
socket's address; a regular file at the path was deleted. Each is now refused with a
clear message, and the agent removes only the socket it made. Real agent processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.remote.pki import make_pki
from tests.remote.tls_setup import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("agentpki"))


def start(pki: dict[str, Path], path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p11gate.cli", "agent", "--listen", f"unix:path={path}",
         "--cert", str(pki["tenant-a.pem"]), "--key", str(pki["tenant-a.key"]),
         "--ca", str(pki["ca"]), f"tls:127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def refused(pki: dict[str, Path], path: Path) -> str:
    """The agent's error, after it exited without serving."""
    p = start(pki, path)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it went on serving
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"the agent served at {path}: {out!r}")
    assert p.returncode == 2, (out, err)
    assert "P11_KIT_SERVER_ADDRESS" not in out
    return err


def serving(pki: dict[str, Path], path: Path) -> subprocess.Popen[str]:
    p = start(pki, path)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith(f"P11_KIT_SERVER_ADDRESS=unix:path={path};"), line
    return p


def stop(p: subprocess.Popen[str]) -> None:
    p.terminate()
    p.communicate(timeout=30)


def test_a_directory_anyone_can_write_is_refused(pki: dict[str, Path],
                                                 tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    err = refused(pki, d / "agent.sock")
    assert "any local user can write this directory" in err and "Traceback" not in err
    assert not (d / "agent.sock").exists()
    # with the sticky bit (as /tmp) others cannot replace the agent's socket: served
    d.chmod(0o1777)
    stop(serving(pki, d / "agent.sock"))


def test_a_live_socket_or_another_file_is_not_taken(pki: dict[str, Path],
                                                   tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    first = serving(pki, path)
    try:
        err = refused(pki, path)
        assert "is in use by pid" in err, err
        # the first agent still has its address
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        assert first.poll() is None
    finally:
        stop(first)
    assert not path.exists()  # the first removed its own socket when it stopped
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    err = refused(pki, notes)
    assert "exists and is not a socket" in err, err
    assert notes.read_text() == "keep me"
    # a stale socket (its process died) is replaced
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    stop(serving(pki, path))
    assert os.path.exists(str(notes))

"""A stopped worker (SIGSTOP, a debugger) is told apart from a running one at a missed
deadline: a pool then fails the call over as from a dead member (member._failure)."""

from __future__ import annotations

import os
import signal
import subprocess

from p11gate.backends.worker_process import _stopped


def test_stopped_reads_the_process_state() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not _stopped(p.pid)
        os.kill(p.pid, signal.SIGSTOP)
        os.waitpid(p.pid, os.WUNTRACED)  # stopped for sure
        assert _stopped(p.pid)
        os.kill(p.pid, signal.SIGCONT)
    finally:
        p.kill()
        p.wait()
    assert not _stopped(p.pid)  # gone: unknown, not stopped

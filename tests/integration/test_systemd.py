"""Running under systemd: the unit files verify, the daemon tells systemd when it is ready
(and when it reloads and stops), serves sockets systemd bound for it, and writes log lines
the journal files under the right priority."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, RawClient, wait_for, write_config
from tests.softhsm import make_token

C_GetSlotList = 4
UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_token(tmp_path_factory.mktemp("softhsm"))


def _p11gate_command() -> str:
    found = shutil.which("p11gate") or str(Path(sys.executable).with_name("p11gate"))
    assert os.access(found, os.X_OK), found
    return found


def test_unit_files_verify_and_are_hardened(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts both units (ExecStart pointed at this install's
    p11gate), and `systemd-analyze security` rates the service's exposure as OK."""
    assert shutil.which("systemd-analyze"), "systemd-analyze (package systemd) is needed"
    service = (UNITS / "p11gate.service").read_text()
    assert "ExecStart=/usr/local/bin/p11gate serve " in service
    (tmp_path / "p11gate.service").write_text(
        service.replace("/usr/local/bin/p11gate", _p11gate_command()))
    shutil.copy(UNITS / "p11gate.socket", tmp_path / "p11gate.socket")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "./p11gate.socket", "./p11gate.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "p11gate" not in verify.stderr, verify.stderr  # no warning about our units
    for setting in ("Type=notify", "StateDirectory=p11gate", "StateDirectoryMode=0700",
                    "RuntimeDirectory=p11gate", "ProtectSystem=strict", "NoNewPrivileges=yes",
                    "PrivateTmp=yes", "ProtectHome=yes",
                    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert re.search(rf"^{re.escape(setting)}$", service, re.M), setting
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "./p11gate.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for p11gate.service: ([0-9.]+)", sec.stdout)
    assert m, sec.stdout[-2000:] + sec.stderr
    assert float(m.group(1)) <= 3.0, sec.stdout[-3000:]


class NotifyListener:
    """The test's own NOTIFY_SOCKET: collects the datagrams the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[list[str]] = []

    def next(self, timeout: float = 30.0) -> list[str]:
        self.sock.settimeout(timeout)
        msg = self.sock.recv(4096).decode().split("\n")
        self.messages.append(msg)
        return msg

    def close(self) -> None:
        self.sock.close()


def test_ready_after_listeners_accept_reloading_and_stopping(token: dict,
                                                             tmp_path: Path) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    cfg = write_config(tmp_path, token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "p11gate.log", "wb"),
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.next()
        # the moment READY=1 arrives a client is served: listener up, token attached
        assert "READY=1" in ready, ready
        assert f"MAINPID={proc.pid}" in ready
        c = RawClient(str(tmp_path / "p11gate.sock"))
        c.initialize()
        (slots,) = c.call(C_GetSlotList, [1, 16])
        assert len(slots) == 1
        c.close()

        proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert reloading[0] == "RELOADING=1", reloading
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1]), reloading
        assert "READY=1" in notify.next()
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        assert notify.next() == ["STOPPING=1"]
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def _activated(cmd: list[str], socks: list[socket.socket], env: dict[str, str],
               log: Path, names: str = "unix") -> subprocess.Popen[bytes]:
    """Start ``cmd`` the way systemd does: the listening sockets as fds 3, 4, …,
    LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID = the pid that execs p11gate (the shell's
    $$ is kept across exec)."""
    fds = [s.fileno() for s in socks]
    targets = list(range(3, 3 + len(fds)))

    def place() -> None:
        # via fresh numbers first: a socket may already sit on another one's target
        tmp = [os.dup(fd) for fd in fds]
        for t, fd in zip(targets, tmp, strict=True):
            os.dup2(fd, t)

    return subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *cmd],
        env={**env, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names},
        pass_fds=targets, preexec_fn=place,
        stdout=subprocess.PIPE, stderr=open(log, "wb"))


def test_socket_activation_serves_and_keeps_the_socket_file(token: dict,
                                                            tmp_path: Path) -> None:
    cfg = write_config(tmp_path, token)
    path = tmp_path / "p11gate.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    inode = os.stat(path).st_ino
    # a client may connect before the gateway even runs: systemd holds the socket
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(path))
    proc = _activated([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                      [listener], dict(os.environ), tmp_path / "p11gate.log")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "P11_KIT_SERVER_ADDRESS=" in line, (tmp_path / "p11gate.log").read_text()
        log = (tmp_path / "p11gate.log").read_text()
        assert '"from_systemd": true' in log, log
        # the connection made before the gateway started is served, and a new one too
        early_client = RawClient(None, sock=early)
        early_client.initialize()
        c = RawClient(str(path))
        c.initialize()
        (slots,) = c.call(C_GetSlotList, [1, 16])
        assert len(slots) == 1
        c.close()
        early_client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "p11gate.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the socket unit's file: still there, still the same socket, still listening
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_ino == inode
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(path))  # the listener (held by "systemd", the test) accepts
    probe.close()
    listener.close()


def test_socket_for_no_listen_address_is_refused(token: dict, tmp_path: Path) -> None:
    """A unit and a configuration that disagree: named, and nothing served blindly."""
    cfg = write_config(tmp_path, token)
    other = tmp_path / "elsewhere.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(other))
    listener.listen(4)
    proc = _activated([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                      [listener], dict(os.environ), tmp_path / "p11gate.log")
    try:
        assert proc.wait(30) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "p11gate.log").read_text()
    assert "no listen address matches" in err and str(other) in err, err
    assert not (tmp_path / "p11gate.sock").exists()
    listener.close()


def test_journal_stream_lines_carry_priorities(tmp_path: Path) -> None:
    """With stderr being the journal stream (JOURNAL_STREAM = its device:inode), each
    line starts with its syslog priority: <4> for a warning, <3> for an error, <6> info."""
    cfg = write_config(tmp_path, {"module": "/bin/true", "conf": "/nonexistent",
                                  "label": "none"})
    log = tmp_path / "p11gate.log"
    log.touch()
    st = os.stat(log)
    gw = Gateway(cfg, env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        assert wait_for(lambda: "backend restart failed" in gw.log(), 20), gw.log()
    finally:
        gw.stop()
    lines = [ln for ln in gw.log().splitlines() if ln]
    assert lines and all(re.match(r"<[0-7]>", ln) for ln in lines), lines
    assert any(ln.startswith("<4>") and "backend restart failed" in ln for ln in lines)
    assert any(ln.startswith("<3>") and "backend failed to start" in ln for ln in lines)
    assert any(ln.startswith("<6>") and '"listening"' in ln for ln in lines)


def test_without_journal_stream_no_prefixes(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited from a journal-logged shell, stderr elsewhere: plain."""
    cfg = write_config(tmp_path, {"module": "/bin/true", "conf": "/nonexistent",
                                  "label": "none"})
    gw = Gateway(cfg, env={**os.environ, "JOURNAL_STREAM": "1:2"})
    try:
        time.sleep(0.5)
    finally:
        gw.stop()
    assert gw.records() and not re.search(r"^<\d>", gw.log(), re.M)


def test_serves_under_the_units_hardening(tmp_path: Path) -> None:
    """The service's confinement, rebuilt without systemd (this container has no systemd
    as PID 1): a private mount namespace with the whole file system read-only except the
    state/runtime directory (ProtectSystem=strict + StateDirectory/RuntimeDirectory),
    empty /tmp, /var/tmp and /home (PrivateTmp, ProtectHome; /root, where this test's
    Python lives, stays read-only), no new privileges and no capabilities at all. The
    gateway starts, a raw client logs in and finds the token's keys."""
    for tool in ("unshare", "setpriv", "mount"):
        assert shutil.which(tool), tool
    run = Path(f"/run/p11gate-hardening-{os.getpid()}")
    run.mkdir(mode=0o755)
    try:
        token = make_token(run / "softhsm")
        cfg = write_config(run, token)
        # the checkout and its Python, where they lie under a directory the unit hides
        # (a clone in /tmp, say), are bound back read-only, as a real unit's
        # ExecStart program would be installed outside them
        hidden = (Path("/tmp"), Path("/var/tmp"), Path("/home"))
        code = {Path(__file__).resolve().parents[2], Path(sys.prefix),
                Path(sys.executable).resolve().parent.parent}
        keep = sorted(p for p in code if any(p.is_relative_to(h) for h in hidden))
        hold = "".join(f"mkdir -p {run}/keep/{i}; mount --bind {shlex.quote(str(p))} "
                       f"{run}/keep/{i}; " for i, p in enumerate(keep))
        back = "".join(f"mkdir -p {shlex.quote(str(p))}; mount --bind {run}/keep/{i} "
                       f"{shlex.quote(str(p))}; mount -o remount,bind,ro "
                       f"{shlex.quote(str(p))}; " for i, p in enumerate(keep))
        script = (
            "set -e; mount --make-rprivate /; mount -o remount,bind,ro /; "
            f"mount --bind {run} {run}; mount -o remount,bind,rw {run}; {hold}"
            "for d in /tmp /var/tmp /home; do mount -t tmpfs -o mode=1777 tmpfs $d; done; "
            f"{back}"
            "exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "
            '--ambient-caps=-all "$@"'
        )
        proc = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m",
             "p11gate.cli", "serve", "--config", str(cfg)],
            stdout=subprocess.PIPE, stderr=open(run / "p11gate.log", "wb"),
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert "P11_KIT_SERVER_ADDRESS=" in line, (run / "p11gate.log").read_text()
            caps = Path(f"/proc/{proc.pid}/status").read_text()
            assert re.search(r"^CapEff:\s+0+$", caps, re.M), caps
            assert re.search(r"^NoNewPrivs:\s+1$", caps, re.M), caps
            c = RawClient(str(run / "p11gate.sock"))
            c.initialize()
            (slots,) = c.call(C_GetSlotList, [1, 16])
            (session,) = c.call(10, [slots[0], 6])  # C_OpenSession(RW | SERIAL)
            assert c.call(18, [session, 1, b"1234"]) == []  # C_Login(CKU_USER)
            assert len(c.find(session, [])) >= 4  # two key pairs
            c.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, (run / "p11gate.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_socket_activation_of_the_tls_listener(token: dict, tmp_path: Path) -> None:
    """Both listeners from systemd (FileDescriptorName unix and tls): a client
    certificate's TLS connection is served on the passed TCP socket, which systemd
    (the test) still holds, listening, after the stop."""
    from tests.adversarial.tls_pki import make_two_ca_pki

    pki = make_two_ca_pki(tmp_path / "pki")
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "p11gate.sock"))
    unix.listen(16)
    cfg = write_config(tmp_path, token)
    text = cfg.read_text().replace(
        f'listen = "unix:path={tmp_path / "p11gate.sock"}"',
        f'listen = ["unix:path={tmp_path / "p11gate.sock"}", "tls:127.0.0.1:{port}"]')
    text += (f'\n[tls]\ncert = "{pki["server.pem"]}"\nkey = "{pki["server.key"]}"\n'
             f'client_ca = "{pki["client_ca"]}"\n')
    cfg.write_text(text)
    proc = _activated([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                      [unix, tcp], dict(os.environ), tmp_path / "p11gate.log", "unix:tls")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "P11_KIT_SERVER_ADDRESS=" in line, (tmp_path / "p11gate.log").read_text()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=pki["ca_a"])
        ctx.load_cert_chain(pki["tenant-a.pem"], pki["tenant-a.key"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        c = RawClient(None, sock=ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        c.initialize()
        (slots,) = c.call(C_GetSlotList, [1, 16])
        assert len(slots) == 1
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "p11gate.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    probe = socket.create_connection(("127.0.0.1", port), timeout=5)  # still listening
    probe.close()
    tcp.close()
    unix.close()

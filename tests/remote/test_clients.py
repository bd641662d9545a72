"""The client side of remote access with real parts: pkcs11-tool through the stock
p11-kit-proxy.so with a `remote: |p11gate tunnel …` module file (p11-kit's own way to run
a command for a module), the tunnel's life cycle on p11-kit's socketpair, and the agent
skipping a dead and a hung gateway; real gateway, real SoftHSM, signatures verified with
`cryptography`.

p11-kit 0.24 (Debian 12) also accepts ``P11_KIT_SERVER_ADDRESS="|command …"`` in
p11-kit-client.so: the address goes to the same transport code as module files
(``p11_rpc_transport_new``: ``|`` = run a command, ``unix:path=/…``, ``vsock:``);
tests/remote/test_tls.py uses that form.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway, wait_for
from tests.remote.crl_gateway import CrlGateway
from tests.remote.tls_setup import (
    free_port,
    open_config,
    refused,
    stop_checked,
    tls_setup,
    tls_socket,
)

from p11gate.codec import HANDSHAKE, V0241, build_frame, decode_reply, encode_request

PROXY_MODULE = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"
P11GATE = str(Path(sys.executable).parent / "p11gate")  # the installed console script
C_Initialize, C_GetSlotList = 1, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("remote-clients")
    s = tls_setup(base)
    config = open_config(base / "gw", s.token, s.pki, s.port)
    gw = Gateway(config)
    yield {"gw": gw, "pki": s.pki, "port": s.port, "token": s.token, "base": base,
           "config": config}
    stop_checked(gw)


def tunnel_argv(setup: dict[str, Any], *gateways: str, client: str = "tenant-a") -> list[str]:
    pki = setup["pki"]
    return [P11GATE, "tunnel", "--cert", str(pki[f"{client}.pem"]),
            "--key", str(pki[f"{client}.key"]), "--ca", str(pki["ca"]),
            *(gateways or (f"tls:127.0.0.1:{setup['port']}",))]


def pkcs11_tool(module: str, env: dict[str, str], *args: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["pkcs11-tool", "--module", module, *args], env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{args} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def sign_01_and_verify(module: str, env: dict[str, str], tmp: Path,
                       *select: str) -> None:
    """ECDSA with the token's key 01 (make_token), checked against its public key."""
    digest = hashlib.sha256(os.urandom(64)).digest()
    (tmp / "digest").write_bytes(digest)
    pkcs11_tool(module, env, *select, "--login", "--pin", "1234", "--sign", "--mechanism",
                "ECDSA", "--id", "01", "-i", str(tmp / "digest"), "-o", str(tmp / "sig"))
    pkcs11_tool(module, env, *select, "--read-object", "--type", "pubkey", "--id", "01",
                "-o", str(tmp / "pub.der"))
    key = load_der_public_key((tmp / "pub.der").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = (tmp / "sig").read_bytes()
    n = len(sig) // 2
    key.verify(encode_dss_signature(int.from_bytes(sig[:n], "big"),
                                    int.from_bytes(sig[n:], "big")),
               digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.fixture(scope="module")
def module_dir_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/remote/p11kit_dirs.c built as a preload library (gcc is installed by
    scripts/install-deps.sh)."""
    out = tmp_path_factory.mktemp("shim") / "p11kit_dirs.so"
    libp11kit = Path(PROXY_MODULE).resolve()
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out),
                    str(Path(__file__).with_name("p11kit_dirs.c")), str(libp11kit)],
                   check=True, timeout=120)
    return out


def test_p11kit_proxy_module_file_runs_the_tunnel(setup: dict[str, Any], tmp_path: Path,
                                                  module_dir_shim: Path) -> None:
    """A module file `remote: |p11gate tunnel …`: an application loading p11-kit-proxy.so
    gets the remote token as a slot. Real deployments put the file in
    /etc/pkcs11/modules/ (or ~/.config/pkcs11/modules/ for a non-root user); the test
    points p11-kit at its own directory instead (module_dir_shim)."""
    modules = tmp_path / "modules"
    modules.mkdir()
    # the short form: the tunnel's settings from the environment the application has
    (modules / "p11gate.module").write_text(f"remote: |{P11GATE} tunnel\n")
    pki = setup["pki"]
    env = {**os.environ, "LD_PRELOAD": str(module_dir_shim),
           "P11GATE_TEST_MODULE_DIR": str(modules),
           "P11GATE_TLS_CERT": str(pki["tenant-a.pem"]),
           "P11GATE_TLS_KEY": str(pki["tenant-a.key"]), "P11GATE_TLS_CA": str(pki["ca"]),
           "P11GATE_GATEWAYS": f"tls:127.0.0.1:{free_port()} tls:127.0.0.1:{setup['port']}"}
    env.pop("P11_KIT_SERVER_ADDRESS", None)
    before = setup["gw"].log().count("cert=CN=tenant-a")
    out = pkcs11_tool(PROXY_MODULE, env, "-L").stdout
    assert "token label        : signing" in out
    assert out.count("Slot ") == 1  # only our module: the system's are not loaded
    sign_01_and_verify(PROXY_MODULE, env, tmp_path, "--token-label", "signing")
    # each C_Initialize of the proxy ran one tunnel, i.e. one TLS connection
    assert wait_for(lambda: setup["gw"].log().count("cert=CN=tenant-a") >= before + 3)


def rpc_over(sock: socket.socket) -> list[Any]:
    """Version byte, C_Initialize, C_GetSlotList over a byte stream; the slot list."""
    sock.sendall(b"\x00" + build_frame(0x11, encode_request(
        C_Initialize, [HANDSHAKE, 0, b"\0"], V0241), b"client"))
    buf = b""
    while len(buf) < 1 + 12:
        buf += sock.recv(65536)
    code, olen, blen = (int.from_bytes(buf[1 + 4 * i:5 + 4 * i], "big") for i in range(3))
    while len(buf) < 13 + olen + blen:
        buf += sock.recv(65536)
    assert code == 0x11
    args: list[Any] = [1, 8]
    sock.sendall(build_frame(0x12, encode_request(C_GetSlotList, args, V0241), b"client"))
    buf = b""
    while len(buf) < 12:
        buf += sock.recv(65536)
    olen, blen = int.from_bytes(buf[4:8], "big"), int.from_bytes(buf[8:12], "big")
    while len(buf) < 12 + olen + blen:
        buf += sock.recv(65536)
    return list(decode_reply(buf[12 + olen:12 + olen + blen], V0241, C_GetSlotList, args)[0])


def start_tunnel(argv: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Run the tunnel as p11-kit does: one end of a socketpair as its stdin and stdout."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
    theirs.close()
    ours.settimeout(15)
    return proc, ours


def test_tunnel_carries_rpc_and_exits_when_the_client_closes(setup: dict[str, Any]) -> None:
    proc, sock = start_tunnel(tunnel_argv(setup))
    try:
        assert len(rpc_over(sock)) == 1
        sock.close()  # the application finalized: p11-kit closes its end
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tunnel_exits_when_the_gateway_closes(setup: dict[str, Any]) -> None:
    proc, sock = start_tunnel(tunnel_argv(setup))
    try:
        assert len(rpc_over(sock)) == 1
        # a frame far over max_frame: the gateway closes this connection
        sock.sendall((0x13).to_bytes(4, "big") + (0).to_bytes(4, "big")
                     + (1 << 31).to_bytes(4, "big"))
        assert sock.recv(10) == b""  # the tunnel closed our end
        assert proc.wait(5) == 0
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
    assert setup["gw"].alive()


def test_tunnel_tries_gateways_in_order_and_says_when_none_answers(
        setup: dict[str, Any]) -> None:
    dead = f"tls:127.0.0.1:{free_port()}"
    proc, sock = start_tunnel(tunnel_argv(setup, dead, f"tls:127.0.0.1:{setup['port']}"))
    try:
        assert len(rpc_over(sock)) == 1
    finally:
        sock.close()
        proc.wait(5)
    t0 = time.monotonic()
    proc, sock = start_tunnel(tunnel_argv(setup, dead))
    assert proc.wait(10) == 1
    assert time.monotonic() - t0 < 8
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    lines = err.splitlines()
    assert lines[-1].startswith("p11gate tunnel: no gateway reachable") and dead in lines[-1]
    assert lines[0].startswith("warning p11gate.remote: gateway unreachable, trying the next")
    assert f"address={dead}" in lines[0] and "error=" in lines[0], err
    assert sock.recv(10) == b""  # the client sees a closed connection (CKR_DEVICE_ERROR)
    sock.close()


class Agent:
    def __init__(self, base: Path, pki: dict[str, Path], gateways: list[str],
                 timeout: float = 1.0) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.path = base / "agent.sock"
        self.log_path = base / "agent.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [P11GATE, "agent", "--listen", f"unix:path={self.path}",
             "--cert", str(pki["tenant-b.pem"]), "--key", str(pki["tenant-b.key"]),
             "--ca", str(pki["ca"]), "--timeout", str(timeout), *gateways],
            stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line == (f"P11_KIT_SERVER_ADDRESS=unix:path={self.path}; "
                        "export P11_KIT_SERVER_ADDRESS;\n"), line + self.log()
        self.env = {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={self.path}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


def test_agent_skips_dead_and_hung_gateways_and_survives_having_none(
        setup: dict[str, Any], tmp_path: Path) -> None:
    # a gateway that accepts TCP but never answers the TLS handshake (a hung host)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    hung_addr = f"tls:127.0.0.1:{hung.getsockname()[1]}"
    dead_addr = f"tls:127.0.0.1:{free_port()}"
    live_addr = f"tls:127.0.0.1:{setup['port']}"
    agent = Agent(tmp_path / "a1", setup["pki"], [dead_addr, hung_addr, live_addr])
    try:
        assert os.stat(agent.path).st_mode & 0o777 == 0o600
        sign_01_and_verify(CLIENT_MODULE, agent.env, tmp_path)
        assert "cert=CN=tenant-b,O=p11gate tests" in setup["gw"].log()
        log = agent.log()
        assert dead_addr in log and hung_addr in log  # both tried, then skipped
        # the live gateway is remembered: later connections go there first, at once
        skipped, relayed = log.count("trying the next"), log.count('"relaying"')
        pkcs11_tool(CLIENT_MODULE, agent.env, "-L")
        assert wait_for(lambda: agent.log().count('"relaying"') == relayed + 1)
        assert agent.log().count("trying the next") == skipped
    finally:
        agent.stop()
    agent = Agent(tmp_path / "a2", setup["pki"], [dead_addr])
    try:
        r = pkcs11_tool(CLIENT_MODULE, agent.env, "-L", check=False)
        assert r.returncode != 0
        assert wait_for(lambda: "no gateway for a local client" in agent.log())
        assert agent.proc.poll() is None  # still serving; a gateway may come back
    finally:
        agent.stop()
        hung.close()


def test_tls_session_is_1_3_with_the_tunnel_client_context(setup: dict[str, Any]) -> None:
    """The client context the tunnel and agent use refuses anything below TLS 1.3 and
    checks the gateway's name: a wrong server name fails before any byte is relayed."""
    from p11gate.remote.tls import client_context

    pki = setup["pki"]
    ctx = client_context(str(pki["tenant-a.pem"]), str(pki["tenant-a.key"]), str(pki["ca"]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.check_hostname
    with socket.create_connection(("127.0.0.1", setup["port"]), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="gw.elsewhere.example")


def test_refused_tls_clients_leave_nothing_behind(setup: dict[str, Any]) -> None:
    """Refused handshakes (no, untrusted, revoked certificate, TLS 1.2) are not counted
    or kept as connections; a client that got in is, until it leaves."""
    import json

    def connections() -> int:
        r = subprocess.run([P11GATE, "status", "--json", "--config", str(setup["config"])],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["connections"])

    pki, port = setup["pki"], setup["port"]
    assert wait_for(lambda: connections() == 0)
    for _ in range(5):
        assert refused(pki, port, None) and refused(pki, port, "untrusted")
        assert refused(pki, port, "revoked") and refused(pki, port, "tenant-a", tls12=True)
    good = tls_socket(pki, port, "tenant-a")
    try:
        good.sendall(b"\x00")
        assert good.recv(1) == b"\x00"  # served: the gateway answered the version byte
        assert connections() == 1
    finally:
        good.close()
    assert wait_for(lambda: connections() == 0)


def test_p11kit_client_runs_the_tunnel_from_the_address_with_loose_spacing(
        setup: dict[str, Any]) -> None:
    """P11_KIT_SERVER_ADDRESS="|…" in the stock 0.24 p11-kit-client.so: p11-kit turns
    each extra space into an empty word; the tunnel still finds its gateways."""
    pki = setup["pki"]
    address = (f"|{P11GATE} tunnel --cert {pki['tenant-a.pem']} --key {pki['tenant-a.key']}"
               f" --ca {pki['ca']}  tls:127.0.0.1:{setup['port']}  ")
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": address}
    out = pkcs11_tool(CLIENT_MODULE, env, "-L").stdout
    assert "token label        : signing" in out


def test_a_changed_crl_is_reloaded_while_the_gateway_runs(setup: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """A revocation published while the gateway runs applies to the next handshakes; a
    CRL file that does not check out is logged and ignored (the previous one stays)."""
    g = CrlGateway(setup, tmp_path, first_crl_days=7)
    try:
        assert not g.refused("revoke") and not g.refused("keep")
        g.publish(["revoke"], days=7)
        assert wait_for(lambda: "CRL reloaded" in g.gw.log())
        assert g.refused("revoke") and not g.refused("keep")
        g.publish([], days=7, junk=True)
        assert wait_for(lambda: "CRL changed but not loaded" in g.gw.log())
        assert g.refused("revoke") and not g.refused("keep")
        assert g.gw.alive()
    finally:
        g.gw.stop()


def test_an_expiring_crl_is_an_alarm_and_a_fresh_one_heals_without_restart(
        setup: dict[str, Any], tmp_path: Path) -> None:
    g = CrlGateway(setup, tmp_path, first_crl_days=6 / 86400)  # valid for 6 s
    try:
        assert not g.refused("keep")
        assert wait_for(lambda: "CRL expired: every TLS client of this CA is refused"
                        in g.gw.log(), timeout=15)
        assert g.refused("keep")  # OpenSSL: "CRL has expired"
        g.publish([], days=7)
        assert wait_for(lambda: "CRL reloaded" in g.gw.log())
        assert not g.refused("keep")
        assert g.gw.alive()
    finally:
        g.gw.stop()


def test_a_busy_tls_port_is_a_clear_error(setup: dict[str, Any], tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cfg = open_config(tmp_path / "gw", setup["token"], setup["pki"],
                          busy.getsockname()[1])
        r = subprocess.run([P11GATE, "serve", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60)
    finally:
        busy.close()
    assert r.returncode == 2
    assert f"{cfg}: server.listen: " in r.stderr and "address already in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "gw" / "gw.sock").exists()  # what did start was stopped

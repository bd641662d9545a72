"""Remote access over TLS (issue 4): the gateway's TLS 1.3 listener with client
certificates, identities from certificates, `p11gate tunnel` and `p11gate agent`, with
the real p11-kit-client.so and pkcs11-tool against real SoftHSMv2."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, wait_for
from tests.remote.tls_setup import (
    free_port,
    gateway_config,
    refused,
    stop_checked,
    tls_setup,
    tls_socket,
)

from p11gate.admin import query

C_GetSlotList, C_GetTokenInfo = 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("tls")
    s = tls_setup(base)
    gw = Gateway(gateway_config(base / "gw1", s.token, s.pki, s.port))
    yield {"gw": gw, "pki": s.pki, "port": s.port, "token": s.token, "base": base}
    stop_checked(gw)


def test_tls_refuses_missing_untrusted_revoked_and_tls12_clients(setup: dict[str, Any]) -> None:
    pki, port, gw = setup["pki"], setup["port"], setup["gw"]
    admin = str(setup["base"] / "gw1" / "state" / "admin.sock")
    assert not refused(pki, port, "tenant-a")  # the probe itself can tell
    before = query(admin)["tls_refused"]
    assert refused(pki, port, None)
    assert refused(pki, port, "untrusted")
    assert refused(pki, port, "revoked")
    assert refused(pki, port, "tenant-a", tls12=True)
    # each refusal is logged with its peer and why, and counted in the status
    assert wait_for(lambda: query(admin)["tls_refused"] - before == 4)
    reasons = [r["reason"] for r in gw.records() if r.get("msg") == "TLS client refused"]
    assert all(r for r in reasons) and len(reasons) >= 4, reasons
    text = " ".join(reasons)
    assert "peer did not return a certificate" in text
    assert "unable to get local issuer certificate" in text  # untrusted
    assert "certificate revoked" in text
    assert "unsupported protocol" in text  # TLS 1.2
    # the gateway is still up and serves a trusted client over TLS 1.3
    assert gw.alive()
    s = tls_socket(pki, port, "tenant-a")
    assert s.version() == "TLSv1.3"
    c = RawClient(None, sock=s)
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 8])
    assert len(slots) == 1
    assert c.call(C_GetTokenInfo, [slots[0]])[0].rstrip(b" ") == b"signing"
    c.close()
    # the connection's identity is the certificate's subject
    assert wait_for(lambda: "cert=CN=tenant-a,O=p11gate tests" in gw.log())


def tunnel_env(setup: dict[str, Any], client: str) -> dict[str, str]:
    pki = setup["pki"]
    cmd = (f"|{sys.executable} -m p11gate.cli tunnel --cert {pki[client + '.pem']} "
           f"--key {pki[client + '.key']} --ca {pki['ca']} tls:127.0.0.1:{setup['port']}")
    return {**os.environ, "P11_KIT_SERVER_ADDRESS": cmd}


def tool(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args], env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{args} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def sign_and_verify(env: dict[str, str], pin: str, kid: str, tmp: Path) -> None:
    data = tmp / f"data-{kid}"
    data.write_bytes(os.urandom(32))
    sig = tmp / f"sig-{kid}"
    tool(env, "--login", "--pin", pin, "--sign", "--mechanism", "ECDSA", "--id", kid,
         "-i", str(data), "-o", str(sig))
    pub = tmp / f"pub-{kid}.der"
    tool(env, "--read-object", "--type", "pubkey", "--id", kid, "-o", str(pub))
    key = load_der_public_key(pub.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    raw_sig = sig.read_bytes()
    n = len(raw_sig) // 2
    der = encode_dss_signature(int.from_bytes(raw_sig[:n], "big"),
                               int.from_bytes(raw_sig[n:], "big"))
    key.verify(der, data.read_bytes(), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_two_certificate_tenants_through_the_tunnel(setup: dict[str, Any],
                                                     tmp_path: Path) -> None:
    pin = setup["token"]["pin"]
    env_a, env_b = tunnel_env(setup, "tenant-a"), tunnel_env(setup, "tenant-b")
    tool(env_a, "--login", "--pin", pin, "--keypairgen", "--key-type", "EC:prime256v1",
         "--id", "a0", "--label", "remote-a")
    tool(env_b, "--login", "--pin", pin, "--keypairgen", "--key-type", "EC:prime256v1",
         "--id", "b0", "--label", "remote-b")
    list_a = tool(env_a, "--login", "--pin", pin, "-O").stdout
    list_b = tool(env_b, "--login", "--pin", pin, "-O").stdout
    assert "remote-a" in list_a and "remote-b" not in list_a and "label:      ec1\n" not in list_a
    assert "remote-b" in list_b and "remote-a" not in list_b
    sign_and_verify(env_a, pin, "a0", tmp_path)
    sign_and_verify(env_b, pin, "b0", tmp_path)
    assert tool(env_a, "--login", "--pin", pin, "--sign", "--mechanism", "ECDSA", "--id",
                "b0", "-i", str(tmp_path / "data-a0"), "-o", str(tmp_path / "x"),
                check=False).returncode != 0
    tool(env_b, "--login", "--pin", pin, "--delete-object", "--type", "privkey", "--id", "a0",
         check=False)
    assert "remote-a" in tool(env_a, "--login", "--pin", pin, "-O", "--type",
                              "privkey").stdout
    log = setup["gw"].log()
    assert "cert=CN=tenant-b,O=p11gate tests" in log


class Agent:
    def __init__(self, base: Path, pki: dict[str, Path], client: str, gateways: list[str]):
        self.path = base / "agent.sock"
        self.log_path = base / "agent.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p11gate.cli", "agent", "--listen",
             f"unix:path={self.path}", "--cert", str(pki[f"{client}.pem"]),
             "--key", str(pki[f"{client}.key"]), "--ca", str(pki["ca"]), *gateways],
            stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("P11_KIT_SERVER_ADDRESS=unix:path="), line
        self.address = line.split("=", 1)[1].split(";", 1)[0]

    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": self.address}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


def test_agent_relays_and_fails_over_to_the_next_gateway(setup: dict[str, Any],
                                                         tmp_path: Path) -> None:
    pki, token = setup["pki"], setup["token"]
    port2 = free_port()
    gw2: Gateway | None = None
    # the first gateway of the agent's list is a third one, which we stop below
    port1 = free_port()
    gw1 = Gateway(gateway_config(setup["base"] / "gw-first", token, pki, port1))
    agent = Agent(tmp_path, pki, "tenant-a",
                  [f"tls:127.0.0.1:{port1}", f"tls:127.0.0.1:{port2}"])
    try:
        pin = token["pin"]
        # the second gateway is not up yet: the agent, which spreads connections over
        # the healthy gateways, finds it down and uses the first for all of these (the
        # key is owned in the first one's registry, which the second does not share)
        tool(agent.env(), "--login", "--pin", pin, "--keypairgen", "--key-type",
             "EC:prime256v1", "--id", "a7", "--label", "agent-key")
        sign_and_verify(agent.env(), pin, "a7", tmp_path)
        gw2 = Gateway(gateway_config(setup["base"] / "gw2", token, pki, port2))
        assert "cert=CN=tenant-a" in gw1.log() and "cert=CN=tenant-a" not in gw2.log()
        gw1.stop()
        out = tool(agent.env(), "-L").stdout
        assert "token label        : signing" in out
        assert wait_for(lambda: "cert=CN=tenant-a" in gw2.log())
        assert agent.proc.poll() is None
    finally:
        agent.stop()
        gw1.stop()
        if gw2 is not None:
            gw2.stop()

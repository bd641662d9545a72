"""``[metrics]`` over HTTPS with client certificates: a scraper with a certificate from
the configured CA gets the metrics (calls counted), while plain HTTP, TLS without a
client certificate and a certificate from another CA get nothing, and the gateway keeps
serving its clients. Bad TLS settings are refused by check-config with the key named."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.gateway_proc import write_config
from tests.integration.test_metrics import PIN, metrics_gateway, signer
from tests.metrics_scrape import http, reply
from tests.remote.pki import make_pki
from tests.softhsm import make_token

from p11gate.codec import CALLS_BY_NAME, Mechanism

CKM_ECDSA = 0x1041
SIGN_INIT, SIGN = CALLS_BY_NAME["C_SignInit"].id, CALLS_BY_NAME["C_Sign"].id
GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def _https(address: str, pki: dict[str, Path], client: str | None) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if client is not None:
        ctx.load_cert_chain(str(pki[f"{client}.pem"]), str(pki[f"{client}.key"]))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(GET)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return reply(data)


def _refused(address: str, pki: dict[str, Path], client: str | None) -> bool:
    try:
        status, _ = _https(address, pki, client)
    except (ssl.SSLError, OSError):
        return True
    return status != 200


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("metrics-pki"))


def test_https_metrics_only_for_scrapers_of_the_client_ca(
        pki: dict[str, Path], tmp_path: Path) -> None:
    token = make_token(tmp_path / "softhsm", label="anchor", pin=PIN)
    gw, address = metrics_gateway(
        tmp_path, token, "127.0.0.1:0",
        extra=(f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["server.key"]}"\n'
               f'tls_client_ca = "{pki["ca"]}"\n'))
    try:
        c, sess, key = signer(gw.path)
        for _ in range(5):
            c.call(SIGN_INIT, [sess, Mechanism(CKM_ECDSA, None), key])
            c.call(SIGN, [sess, b"\x01" * 32, 64])
        status, body = _https(address, pki, "tenant-a")
        assert status == 200
        signs = [smp.value for fam in text_string_to_metric_families(body.decode())
                 for smp in fam.samples if smp.name == "p11gate_calls_total"
                 and smp.labels.get("call") == "C_Sign"
                 and smp.labels.get("result") == "CKR_OK"]
        assert signs == [5.0], signs
        # no TLS at all, TLS without a client certificate, a certificate of another CA
        try:
            plain = http(address, GET, timeout=5)
        except OSError:
            plain = (0, b"")
        assert plain[0] != 200 and b"p11gate_calls_total" not in plain[1]
        assert _refused(address, pki, None)
        assert _refused(address, pki, "untrusted")
        # the gateway's clients are not affected
        c.call(SIGN_INIT, [sess, Mechanism(CKM_ECDSA, None), key])
        (sig,) = c.call(SIGN, [sess, b"\x02" * 32, 64])
        assert len(sig) == 64
        assert _https(address, pki, "tenant-b")[0] == 200
        c.close()
        assert gw.alive()
    finally:
        gw.stop()
    assert PIN not in gw.log()


@pytest.mark.parametrize("extra, says", [
    ('tls_cert = "{pem}"\n', "give tls_cert and tls_key together"),
    ('tls_cert = "{pem}"\ntls_key = "/nonexistent.key"\n', "metrics.tls_key"),
    ('tls_client_ca = "{ca}"\n', "tls_client_ca needs tls_cert"),
    ('tls_cert = "relative.pem"\ntls_key = "{key}"\n', "give an absolute path"),
])
def test_bad_tls_settings_are_named(pki: dict[str, Path], tmp_path: Path, extra: str,
                                    says: str) -> None:
    token: dict[str, Any] = make_token(tmp_path / "softhsm", keys=False)
    cfg = write_config(tmp_path, token)
    filled = extra.format(pem=pki["server.pem"], key=pki["server.key"], ca=pki["ca"])
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:0"\n{filled}')
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "check-config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert says in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_key_that_does_not_match_stops_serve_with_one_line(
        pki: dict[str, Path], tmp_path: Path) -> None:
    token: dict[str, Any] = make_token(tmp_path / "softhsm", keys=False)
    cfg = write_config(tmp_path, token)
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:0"\n'
                   f'tls_cert = "{pki["server.pem"]}"\ntls_key = "{pki["tenant-a.key"]}"\n')
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "metrics.listen" in r.stderr and "tls_cert/tls_key" in r.stderr, r.stderr




def test_beyond_loopback_warned_unless_client_certificates_are_required(
        pki: dict[str, Path]) -> None:
    from tests.unit.test_metrics_dashboard import BASE as base

    from p11gate.config import parse_config
    from p11gate.config_checks import metrics_exposure
    tls = {"tls_cert": str(pki["server.pem"]), "tls_key": str(pki["server.key"])}
    only_server = parse_config({**base, "metrics": {"listen": "0.0.0.0:9464", **tls}})
    (warning,) = metrics_exposure(only_server)
    assert "HTTPS without client certificates" in warning
    mutual = parse_config({**base, "metrics": {"listen": "0.0.0.0:9464", **tls,
                                               "tls_client_ca": str(pki["ca"])}})
    assert metrics_exposure(mutual) == []
    with pytest.raises(Exception, match="TCP listen address"):
        parse_config({**base, "metrics": {"listen": "unix:path=/tmp/m.sock", **tls}})

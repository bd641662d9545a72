"""TLS listener metrics: refused handshakes and accepted connections per listener, and
no certificate identity in any label."""

from __future__ import annotations

from pathlib import Path

from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.metrics_scrape import scrape, value
from tests.remote.pki import make_pki
from tests.remote.tls_setup import free_port, gateway_config, refused, tls_socket
from tests.softhsm import make_token


def test_tls_refusals_and_connections_counted(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    token = make_token(tmp_path / "softhsm", keys=False)
    port = free_port()
    cfg = gateway_config(tmp_path / "gw", token, pki, port)
    cfg.write_text(cfg.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    gw = Gateway(cfg)
    try:
        assert gw.proc.stdout is not None
        lines = [gw.proc.stdout.readline().decode() for _ in range(2)]
        address = next(ln for ln in lines if ln.startswith("# metrics on ")).split()[3]
        listener = f"tls:127.0.0.1:{port}"
        s0, _ = scrape(address)
        assert value(s0, "p11gate_tls_handshakes_refused_total", listener=listener) == 0
        assert refused(pki, port, None)
        assert refused(pki, port, "untrusted")
        assert refused(pki, port, "revoked")
        assert refused(pki, port, "tenant-a", tls12=True)
        assert wait_for(lambda: value(scrape(address)[0], "p11gate_tls_handshakes_refused_total",
                                      listener=listener) == 4)
        c = RawClient(None, sock=tls_socket(pki, port, "tenant-a"))
        c.initialize()
        s1, text = scrape(address)
        assert value(s1, "p11gate_connections_accepted_total", listener=listener) == 1
        assert value(s1, "p11gate_connections", listener=listener) == 1
        assert value(s1, "p11gate_calls_total", token="", call="C_Initialize",
                     result="CKR_OK") == 1
        c.close()
        assert wait_for(lambda: value(scrape(address)[0], "p11gate_connections",
                                      listener=listener) == 0)
        # identities never become label values (HELP lines may say "revoked")
        samples = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
        assert "p11gate_tls_handshakes_refused_total" in samples
        for who in ("tenant-a", "untrusted", "revoked", "p11gate tests", "CN="):
            assert who not in samples
    finally:
        alive = gw.alive()
        gw.stop()
    assert alive, gw.log()[-3000:]

"""``[server] processes = 2`` behind a TLS listener: the supervisor accepts the TCP
connection and hands it over before any handshake; the process that takes it runs the
handshake, so the client's identity is its certificate's, and refusals are still each
logged and counted. Raw TLS clients, real SoftHSMv2, the real certificate checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.remote.tls_setup import gateway_config, refused, tls_setup, tls_socket

from p11gate.admin import query

C_GetSlotList, C_GetTokenInfo = 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("tls-processes")
    s = tls_setup(base)
    cfg = gateway_config(base / "gw", s.token, s.pki, s.port)
    text = cfg.read_text()
    cfg.write_text(text.replace("[server]\n", "[server]\nprocesses = 2\n", 1))
    gw = Gateway(cfg)
    yield {"gw": gw, "pki": s.pki, "port": s.port, "admin": str(base / "gw" / "state" /
                                                              "admin.sock")}
    gw.stop()


def _connections(admin: str) -> list[int]:
    return [int(p["status"]["connections"]) for p in query(admin)["processes"]]


def test_tls_clients_are_spread_and_keep_their_certificate_identity(
        setup: dict[str, Any]) -> None:
    pki, port, admin = setup["pki"], setup["port"], setup["admin"]
    clients = []
    try:
        for name in ("tenant-a", "tenant-b", "tenant-a", "tenant-b"):
            c = RawClient(None, sock=tls_socket(pki, port, name))
            c.initialize()
            (slots,) = c.call(C_GetSlotList, [1, 8])
            # each tenant's rule grants the one token: the identity is the certificate's
            assert len(slots) == 1
            assert c.call(C_GetTokenInfo, [slots[0]])[0].rstrip(b" ") == b"signing"
            clients.append(c)
        assert _connections(admin) == [2, 2]
        status = query(admin)
        assert any("tenant-a" in c for c in status["clients"]), status["clients"]
        assert any("tenant-b" in c for c in status["clients"]), status["clients"]
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: _connections(admin) == [0, 0], timeout=30)


def test_refusals_are_counted_across_the_processes(setup: dict[str, Any]) -> None:
    pki, port, admin = setup["pki"], setup["port"], setup["admin"]
    before = query(admin)["tls_refused"]
    for client in (None, "untrusted", "revoked", None):
        assert refused(pki, port, client)
    # four refusals, handed two and two: both processes counted theirs
    assert wait_for(lambda: query(admin)["tls_refused"] - before == 4, timeout=30)
    assert not refused(pki, port, "tenant-a")
    assert setup["gw"].alive()


def test_a_unix_client_beside_tls_gets_its_uid_identity(setup: dict[str, Any]) -> None:
    c = RawClient(str(Path(setup["admin"]).parent.parent / "gw.sock"))
    c.initialize()
    (slots,) = c.call(C_GetSlotList, [1, 8])
    assert len(slots) == 1  # uid 0: the local-admin rule, every token
    c.close()

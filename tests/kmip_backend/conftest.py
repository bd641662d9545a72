"""Fixtures: a real PyKMIP server (TLS, client certificates) and gateway configs that
serve it as the token "kmip"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.kmip_backend.kmip_server import KmipServerProc

USER_PIN = "kmip-pin-4321"


@pytest.fixture(scope="module")
def kmip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServerProc]:
    s = KmipServerProc(tmp_path_factory.mktemp("kmip-server"))
    s.start()
    yield s
    s.stop()


def kmip_gateway_config(base: Path, server: KmipServerProc, extra: str = "",
                        **kmip: object) -> Path:
    pin = base / "kmip.pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={base / 'p11gate.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"

{server.backend_toml("kmip", pin, **kmip)}
{extra}
[[token]]
name = "kmip"
backend = "kmip"
select = {{ label = "kmip" }}
""")
    return cfg

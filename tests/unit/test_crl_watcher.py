"""One CRL watcher per TLS listener: a reload gives the listener a new context and a new
watcher, and stops the old one (before, every reload left one more running)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from p11gate.remote.config import TlsConfig
from p11gate.remote.tls import crl_watchers, watch_crl


class Listener:
    def __init__(self) -> None:
        self.serving = True

    def is_serving(self) -> bool:
        return self.serving


def test_a_reload_replaces_the_listeners_watcher_and_a_closed_listener_has_none(
        tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_text("not a CRL yet\n")  # the watcher logs it and keeps the old one
    with_crl = TlsConfig.model_construct(cert="c", key="k", client_ca=str(tmp_path / "ca"),
                                         crl=str(crl), crl_check_interval=0.1)
    without = TlsConfig.model_construct(cert="c", key="k", client_ca=str(tmp_path / "ca"),
                                        crl=None, crl_check_interval=0.1)

    async def run() -> list[int]:
        counts = []
        a, b = Listener(), Listener()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for _ in range(5):  # start, then four reloads
            watch_crl(a, ctx, with_crl)
            await asyncio.sleep(0.05)
        counts.append(crl_watchers())
        watch_crl(b, ctx, with_crl)
        await asyncio.sleep(0.05)
        counts.append(crl_watchers())
        watch_crl(a, ctx, without)  # a reload that drops the CRL stops a's watcher
        await asyncio.sleep(0.05)
        counts.append(crl_watchers())
        b.serving = False  # a closed listener's watcher ends by itself
        await asyncio.sleep(0.3)
        counts.append(crl_watchers())
        return counts

    assert asyncio.run(run()) == [1, 2, 1, 0]

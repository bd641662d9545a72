"""Half-closed clients: a client that sends its requests and then shuts its write side
(``shutdown(SHUT_WR)``) gets the replies to what the gateway received, then the
connection is closed; one that half-closes and never reads is bounded like any other.

Before: the gateway took EOF for a hang-up and closed at once, so the replies still in
flight (all of them, for a client that pipelines and half-closes) were lost.

Real `p11gate serve` (uvloop, process isolation) on real SoftHSM, raw frames on the unix
socket and raw TLS. Over TLS a close_notify (or a TCP FIN) ends the connection: the
asyncio and uvloop SSL layers stop writing then, whatever the protocol asks; the test
pins what the gateway does there (ends at once, keeps nothing).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import CKM_ECDSA, ID
from tests.adversarial.limits_helpers import rss
from tests.gateway_proc import Gateway, RawClient, sign, signer, wait_for
from tests.remote.tls_setup import TlsSetup, open_config, stop_checked, tls_setup, tls_signer

from p11gate.codec import (
    Mechanism,
    build_frame,
    decode_reply,
    encode_request,
)

FRAME_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsSetup, Gateway,
                                                                       Path]]:
    s = tls_setup(tmp_path_factory.mktemp("halfclose"))
    cfg = open_config(s.base / "gw", s.token, s.pki, s.port)
    cfg.write_text(cfg.read_text().replace(
        'log_format = "json"', f'log_format = "json"\nframe_timeout = {FRAME_TIMEOUT}'))
    gw = Gateway(cfg)
    yield s, gw, cfg
    stop_checked(gw)


def _status(cfg: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "status", "--json", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _requests(c: RawClient, sess: int, key: int, randoms: int,
              size: int = 32) -> tuple[bytes, list[tuple[int, int, list[Any]]]]:
    """``randoms`` C_GenerateRandom of ``size`` bytes, then C_SignInit + C_Sign, all on
    one session (answered in order): the bytes and (code, call id, args) of each."""
    sent: list[tuple[int, int, list[Any]]] = []
    data = bytearray()
    calls: list[tuple[str, list[Any]]] = [("C_GenerateRandom", [sess, size])] * randoms
    calls += [("C_SignInit", [sess, Mechanism(CKM_ECDSA, None), key]),
              ("C_Sign", [sess, b"\x07" * 32, 64])]
    for name, args in calls:
        c.code += 1
        sent.append((c.code, ID(name), args))
        data += build_frame(c.code, encode_request(ID(name), args, c.dialect), b"client")
    return bytes(data), sent


def _check_replies(c: RawClient, sent: list[tuple[int, int, list[Any]]]) -> None:
    for code, call_id, args in sent:
        frame = c.recv_frame()
        assert frame is not None, f"connection closed before the reply to {code:#x}"
        assert frame[0] == code, "replies on one session come in order"
        values = decode_reply(frame[1], c.dialect, call_id, args)
        if call_id == ID("C_Sign"):
            assert len(values[0]) == 64
        elif call_id == ID("C_GenerateRandom"):
            assert len(values[0]) == args[1]


def _eof(sock: socket.socket, timeout: float = 10.0) -> bool:
    """The gateway closes the connection (nothing more comes) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_half_closed_client_gets_every_reply_then_eof(setup: Any) -> None:
    """100 C_GenerateRandom and a C_Sign on one session (past max_calls_in_flight, 32:
    most of them still in the gateway's read buffer at EOF) and half a frame, then
    SHUT_WR: all 102 replies, in order, then EOF; the half frame is not answered."""
    _s, gw, cfg = setup
    c, sess, key = signer(gw.path)
    data, sent = _requests(c, sess, key, randoms=100)
    half = build_frame(0x7777, encode_request(ID("C_GenerateRandom"), [sess, 16],
                                              c.dialect), b"client")
    c.send_raw(data + half[: len(half) // 2])
    c.sock.shutdown(socket.SHUT_WR)
    _check_replies(c, sent)
    assert _eof(c.sock), "the gateway should close once every reply is sent"
    c.close()
    assert wait_for(lambda: _status(cfg)["connections"] == 0)
    # the gateway goes on serving
    c2, sess2, key2 = signer(gw.path)
    sign(c2, sess2, key2)
    c2.close()


def test_a_half_closed_client_with_nothing_in_flight_is_closed_at_once(
        setup: Any) -> None:
    _s, gw, _cfg = setup
    c = RawClient(gw.path)
    c.initialize()
    c.sock.shutdown(socket.SHUT_WR)
    assert _eof(c.sock, timeout=5)
    c.close()


def _aborted(gw: Gateway) -> int:
    return sum(1 for r in gw.records() if r.get("msg", "").startswith(
        "closing client connection: it shut its side and does not read"))


@pytest.mark.parametrize("randoms", [40, 200])
def test_a_half_closed_client_that_never_reads_is_bounded(setup: Any, randoms: int) -> None:
    """Half-close and never read, with ``randoms`` × 64 KiB of replies asked for.

    40 (2.5 MiB, under max_pending_reply_bytes): the gateway reads every request and
    the EOF, the replies wait unsent, and once the client has not read for
    frame_timeout the connection is aborted. 200 (12.5 MiB): the gateway stops reading
    at max_pending_reply_bytes, before the EOF, so the connection is one more client
    that does not read: paused, holding what that bound allows, until it goes.

    Either way the gateway grows < 48 MiB and another client signs meanwhile without
    an error or a slow call."""
    _s, gw, cfg = setup
    base, before = rss(gw), _aborted(gw)
    h, sess, key = signer(gw.path)
    h.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data, _sent = _requests(h, sess, key, randoms=randoms, size=64 * 1024)
    h.send_raw(data)
    h.sock.shutdown(socket.SHUT_WR)
    by, bsess, bkey = signer(gw.path)
    worst, peak = 0.0, 0
    end = time.monotonic() + 3 * FRAME_TIMEOUT + 2
    while time.monotonic() < end and _aborted(gw) == before:
        t0 = time.monotonic()
        sign(by, bsess, bkey)
        worst = max(worst, time.monotonic() - t0)
        peak = max(peak, rss(gw) - base)
    if randoms == 40:
        assert _aborted(gw) == before + 1, gw.log()[-2000:]
        assert wait_for(lambda: _status(cfg)["connections"] == 1)  # the bystander's
    else:
        assert _aborted(gw) == before
        assert _status(cfg)["connections"] == 2
        h.close()
        assert wait_for(lambda: _status(cfg)["connections"] == 1)
    print(f"\nhalf-closed, never reading, {randoms} × 64 KiB: RSS growth "
          f"{peak / 2**20:.0f} MiB, bystander's worst signature {worst * 1000:.0f} ms")
    assert peak < 48 * 2**20
    assert worst < 1.0
    by.close()
    h.close()


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_tls_half_close_ends_the_connection_and_keeps_nothing(setup: Any,
                                                              how: str) -> None:
    """Over TLS the client's close_notify (its TLS 1.3 half-close) or a bare TCP FIN
    ends the connection: what the client gets are whole replies, in order, then the end
    (the calls still at the module are not answered: the SSL layer writes no more after
    a close_notify); the gateway holds no connection afterwards, and another TLS client
    signs on."""
    s, _gw, cfg = setup
    keep, ksess, kkey = tls_signer(s.pki, s.port, "tenant-b")
    c, sess, key = tls_signer(s.pki, s.port, "tenant-a")
    data, sent = _requests(c, sess, key, randoms=100)
    tls = c.sock
    assert isinstance(tls, ssl.SSLSocket)
    tls.sendall(data)
    if how == "close_notify":
        # unwrap() sends close_notify and then reads to the peer's: use the raw socket
        # after sending ours by hand (Python has no TLS half-close call)
        tls.setblocking(False)
        try:
            tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, OSError):
            pass
        tls.setblocking(True)
    else:
        socket.socket.shutdown(tls, socket.SHUT_WR)
    got = 0
    tls.settimeout(10)
    try:
        for code, call_id, args in sent:
            frame = c.recv_frame()
            if frame is None:
                break
            assert frame[0] == code
            decode_reply(frame[1], c.dialect, call_id, args)
            got += 1
    except (ssl.SSLError, OSError):
        pass
    print(f"\nTLS {how}: {got} of {len(sent)} replies before the end")
    assert wait_for(lambda: _status(cfg)["connections"] == 1, timeout=15)
    sign(keep, ksess, kkey)
    keep.close()
    c.close()

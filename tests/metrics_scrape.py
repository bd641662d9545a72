"""Scraping the gateway's /metrics in tests: one HTTP exchange over TCP or a unix
socket, and the samples by (name, labels)."""

from __future__ import annotations

import socket
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http(address: str, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
         timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP exchange with the metrics endpoint (TCP HOST:PORT or a unix path)."""
    if address.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address
    else:
        host, port = address.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    s.settimeout(timeout)
    with s:
        s.connect(target)
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return reply(data)


def reply(data: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP response; (0, b"") when the server closed without one
    (over MAX_CLIENTS, or a TLS 1.3 server refusing the client's certificate)."""
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, b""
    return int(head.split(b" ")[1]), body


def serves(address: str) -> bool:
    try:
        return http(address)[0] == 200
    except OSError:
        return False


def scrape(address: str) -> tuple[Samples, str]:
    status, body = http(address)
    assert status == 200, body
    text = body.decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)

"""The KMIP server's certificate must name the server we meant to reach.

PyKMIP's client checks that the server's certificate chains to the configured CA but
never compares its names with the host it connected to, so any certificate the CA ever
issued (another server's, or a client's) could stand in for the KMIP server. This check
runs on every new connection, before the first request is sent, and follows RFC 6125:
subjectAltName only (no CN fallback), an IP address against iPAddress entries, a DNS name
against dNSName entries with at most one wildcard as the whole leftmost label.
"""

from __future__ import annotations

import ipaddress
import ssl

from cryptography import x509


class ServerNameMismatch(Exception):
    """The server's certificate does not name the configured server."""


def _dns_matches(pattern: str, host: str) -> bool:
    p, h = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not p.startswith("*."):
        return p == h
    rest = p[2:]
    head, sep, tail = h.partition(".")
    return bool(sep) and bool(head) and tail == rest and "*" not in rest


def certificate_names(host: str, der: bytes) -> bool:
    """True if the DER certificate names ``host`` (a DNS name or an IP address)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return any(_dns_matches(n, host) for n in san.get_values_for_type(x509.DNSName))
    return ip in san.get_values_for_type(x509.IPAddress)


def check_server_name(sock: ssl.SSLSocket, host: str) -> None:
    """Raise ServerNameMismatch unless the peer's certificate names ``host``."""
    der = sock.getpeercert(binary_form=True)
    if not der or not certificate_names(host, der):
        raise ServerNameMismatch(f"the KMIP server's certificate does not name {host!r}")

"""Who is on the other end of a connection.

Every connection has an identity before its first call is served: unix peer credentials
on the local socket, the verified client certificate on TLS. Policy rules match on it;
audit records carry it. No identity, no service.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Identity:
    #: "unix" (peer credentials) or "tls" (verified client certificate)
    kind: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    #: RFC 4514 subject of the client certificate, e.g. "CN=app1,O=Example"
    subject: str | None = None
    #: subject alternative names, typed: "DNS:app1.example", "URI:spiffe://…", "EMAIL:…"
    sans: tuple[str, ...] = field(default_factory=tuple)
    #: remote address for TLS ("host:port"), informational only
    address: str | None = None

    def describe(self) -> str:
        """A short, log-safe description (no secrets in an identity)."""
        if self.kind == "unix":
            return f"uid={self.uid} gid={self.gid} pid={self.pid}"
        return f"cert={self.subject}" + (f" from {self.address}" if self.address else "")

    @property
    def key(self) -> str:
        """A stable key for per-identity state (PIN hashes, throttling, ownership):
        the uid locally, the certificate subject remotely; not the pid or address."""
        if self.kind == "unix":
            return f"uid:{self.uid}"
        return f"cert:{self.subject}"


UNKNOWN = Identity(kind="none")

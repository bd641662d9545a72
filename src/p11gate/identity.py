"""Who is on the other end of a connection.

Every connection has an identity before its first call is served: unix peer credentials
on the local socket, the verified client certificate on TLS. Policy rules match on it;
audit records carry it. No identity, no service.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .textsafe import one_line


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
    #: TLS: the client CA this certificate chains to -- the first certificate of the
    #: verified chain, going up from the client's, that is in ``client_ca`` -- as its
    #: RFC 4514 subject, e.g. "CN=Clients CA A,O=Example"
    issuer: str | None = None
    #: TLS: that CA's id, "sha256:" + 32 hex digits of the SHA-256 of its public key
    ca_id: str | None = None
    #: TLS: that CA's position among the distinct CAs of ``client_ca`` (0 = the first)
    ca_index: int | None = None

    def describe(self) -> str:
        """A short, log-safe description (no secrets in an identity; characters a
        certificate may carry that would break a log line are escaped). The CA comes
        first: it is the operator's text, the subject the certificate holder's."""
        if self.kind == "unix":
            return f"uid={self.uid} gid={self.gid} pid={self.pid}"
        ca = f"ca={one_line(self.issuer)} " if self.issuer is not None else ""
        return (f"{ca}cert={one_line(self.subject or '')}"
                + (f" from {self.address}" if self.address else ""))

    @property
    def key(self) -> str:
        """A stable key for per-identity state (PIN hashes, throttling, ownership):
        the uid locally; remotely the certificate subject and its CA: ``cert:<subject>``
        for the first CA of ``client_ca`` (as before there could be several), and
        ``cert:<ca_id>/<subject>`` for the others, so the same subject from two CAs is
        two identities. Not the pid or address."""
        if self.kind == "unix":
            return f"uid:{self.uid}"
        if self.ca_index == 0:
            return f"cert:{self.subject}"
        return f"cert:{self.ca_id}/{self.subject}"


UNKNOWN = Identity(kind="none")

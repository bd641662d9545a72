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
        # a certificate with an empty subject is told apart by its SANs alone: say them
        san = f" san={one_line(self.principal)}" if not self.subject and self.sans else ""
        return (f"{ca}cert={one_line(self.subject or '')}{san}"
                + (f" from {self.address}" if self.address else ""))

    @property
    def principal(self) -> str:
        """TLS: who the certificate names: its subject, or for a certificate with an
        empty subject (SPIFFE and other SAN-only certificates) its SANs, sorted, each
        with ``\\`` and ``,`` escaped by a backslash, joined by ``,``. Without this,
        every SAN-only certificate of a CA was one identity ``cert:``: tenants that
        rules tell apart by SAN shared owned objects, mapped PINs and lock-outs. A SAN
        ("DNS:…", "URI:…") never reads as a subject ("CN=…"), so the two cannot meet."""
        if self.subject:
            return self.subject
        return ",".join(sorted(s.replace("\\", "\\\\").replace(",", "\\,")
                               for s in self.sans))

    @property
    def key(self) -> str:
        """A stable key for per-identity state (PIN hashes, throttling, ownership):
        the uid locally; remotely the certificate's :attr:`principal` (its subject, or
        its SANs when the subject is empty) and its CA: ``cert:<subject>`` for the first
        CA of ``client_ca`` (as before there could be several), and
        ``cert:<ca_id>/<subject>`` for the others, so the same subject from two CAs is
        two identities. Not the pid or address."""
        if self.kind == "unix":
            return f"uid:{self.uid}"
        if self.ca_index == 0:
            return f"cert:{self.principal}"
        return f"cert:{self.ca_id}/{self.principal}"


UNKNOWN = Identity(kind="none")

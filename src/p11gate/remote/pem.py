"""Checks of the PEM files TLS uses, with messages an operator can act on.

The `ssl` module reports a bad file late (when the listener starts or the first connection
is made) and vaguely ("[SSL] PEM lib"); an encrypted key even makes OpenSSL prompt for a
passphrase on the terminal, which hangs an application whose `p11gate tunnel` is waiting.
These checks run when the configuration is read (`check-config` shows them) and before
the tunnel or agent connects. Messages name files, never their contents.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path!r} does not exist (give the path of {what})") from None
    except IsADirectoryError:
        raise ValueError(f"{path!r} is a directory (give the path of {what})") from None
    except PermissionError:
        raise ValueError(f"{path!r} is not readable by this user (fix its owner or "
                         "permissions)") from None


def certificates(path: str, what: str = "a PEM certificate file") -> list[x509.Certificate]:
    """The certificates in a PEM file (at least one)."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"{path!r} holds no PEM certificate (expected '-----BEGIN "
                         "CERTIFICATE-----' blocks)")
    return certs


def check_key(key_path: str, cert_path: str | None) -> None:
    """The key is an unencrypted PEM private key and, given a certificate file, belongs to
    its first certificate."""
    data = _read(key_path, "a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{key_path!r} is encrypted: give an unencrypted key (e.g. "
                         "`openssl pkey -in KEY -out KEY.plain`) and make it readable "
                         "only by p11gate (mode 0600)") from None
    except Exception:  # cryptography raises several types for junk
        raise ValueError(f"{key_path!r} holds no PEM private key") from None
    if cert_path is None:
        return
    try:
        leaf = certificates(cert_path)[0]
    except ValueError:
        return  # reported for the certificate itself
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError(f"{key_path!r} is not the key of the certificate in {cert_path!r} "
                         "(give the matching pair)")


def intermediates(path: str, ca_path: str | None) -> list[x509.Certificate]:
    """The intermediate CA certificates of ``[tls] intermediate_ca``: each a CA
    (basicConstraints) issued, by name and signature, by a CA of ``client_ca`` or by
    another of them. They are not trust anchors: clients still send their chain; they
    are what the CRLs of the CAs between a client and client_ca are checked against."""
    certs = certificates(path, "the PEM file of the intermediate CA certificates")
    roots: list[x509.Certificate] = []
    if ca_path is not None:
        try:
            roots = certificates(ca_path)
        except ValueError:
            pass  # reported for client_ca itself
    for c in certs:
        try:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ValueError(f"{path!r}: {c.subject.rfc4514_string()!r} is not a CA "
                             "certificate (basicConstraints CA:TRUE)")
    known, todo = list(roots), list(certs)
    while todo:  # issuers first, in any order in the file
        issued = [c for c in todo if any(_issued_by(c, k) for k in known)]
        if not issued:
            raise ValueError(
                f"{path!r}: {todo[0].subject.rfc4514_string()!r} is not issued by a CA in "
                "client_ca nor by another intermediate in this file (name and signature)")
        known += issued
        todo = [c for c in todo if c not in issued]
    return certs


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject or cert == ca:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def check_crl(crl_path: str, ca_path: str | None,
              intermediate_path: str | None = None) -> dict[str, dt.datetime]:
    """Every CRL in the file parses, is current, and was issued (name and signature) by
    one of the CAs: a client CA or a listed intermediate; every one of those has a CRL
    (OpenSSL checks each certificate of a client's chain: a CA without a CRL would
    refuse all the clients below it). Returns each issuer's (RFC 4514) nextUpdate:
    when it needs a fresh CRL."""
    data = _read(crl_path, "a PEM CRL file")
    blocks = [b for b in data.split(b"-----END X509 CRL-----") if b"-----BEGIN X509 CRL" in b]
    if not blocks:
        raise ValueError(f"{crl_path!r} holds no PEM CRL (expected '-----BEGIN X509 "
                         "CRL-----' blocks)")
    cas: list[x509.Certificate] = []
    if ca_path is not None:
        try:
            cas = certificates(ca_path)
        except ValueError:
            pass  # reported for client_ca itself
    if intermediate_path is not None:
        try:
            cas += certificates(intermediate_path)
        except ValueError:
            pass  # reported for intermediate_ca itself
    issuers = {c.subject for c in cas}
    now = dt.datetime.now(dt.UTC)
    due: dict[str, dt.datetime] = {}
    crls: list[x509.CertificateRevocationList] = []
    for b in blocks:
        try:
            crl = x509.load_pem_x509_crl(b + b"-----END X509 CRL-----\n")
        except ValueError:
            raise ValueError(f"{crl_path!r}: a CRL in it does not parse") from None
        crls.append(crl)
        nxt = crl.next_update_utc
        if nxt is not None:
            name = crl.issuer.rfc4514_string()
            due[name] = max(nxt, due.get(name, nxt))
        if nxt is not None and nxt < now:
            raise ValueError(
                f"{crl_path!r}: the CRL of {crl.issuer.rfc4514_string()!r} expired on "
                f"{nxt:%Y-%m-%d %H:%M} UTC; every client would be refused: publish a fresh CRL"
            )
        if issuers and crl.issuer not in issuers:
            raise ValueError(
                f"{crl_path!r}: the CRL of {crl.issuer.rfc4514_string()!r} is not from a CA "
                "in client_ca or intermediate_ca (give the CRL of each client CA)"
            )
        # the name is not enough: a CRL another key signed under a client CA's name
        # would pass here and make OpenSSL refuse every client of that CA
        if cas and not any(c.subject == crl.issuer and _signed_by(crl, c) for c in cas):
            raise ValueError(
                f"{crl_path!r}: the CRL of {crl.issuer.rfc4514_string()!r} is not signed by "
                "that CA's key in client_ca or intermediate_ca (give the CRL that CA "
                "issued)"
            )
    if ca_path is not None and issuers:
        covered = {crl.issuer for crl in crls}
        missing = [n.rfc4514_string() for n in issuers if n not in covered]
        if missing:
            raise ValueError(
                f"{crl_path!r} has no CRL for {', '.join(sorted(missing))}: with a CRL, "
                "every client CA and intermediate needs one, or its clients are all refused"
            )
    return due


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a key type CRLs cannot be signed with
        return False


def revoked(crl_path: str) -> set[tuple[bytes, int]]:
    """(issuer name DER, serial number) of every certificate the CRLs in the file revoke;
    the file is :func:`check_crl`'s to judge first."""
    data = _read(crl_path, "a PEM CRL file")
    out: set[tuple[bytes, int]] = set()
    for b in data.split(b"-----END X509 CRL-----"):
        if b"-----BEGIN X509 CRL" not in b:
            continue
        crl = x509.load_pem_x509_crl(b + b"-----END X509 CRL-----\n")
        issuer = crl.issuer.public_bytes()
        out.update((issuer, r.serial_number) for r in crl)
    return out


def key_exposure(key_path: str) -> str | None:
    """Why a private key file is open to other users (group/others may read or write
    it: whoever reads it can be this TLS identity), or None."""
    try:
        mode = os.stat(key_path).st_mode & 0o777
    except OSError:
        return None  # reported by check_key
    if not mode & 0o077:
        return None
    return (f"{key_path!r} is readable or writable by group/others (mode {mode:04o}): "
            f"whoever reads it can pose as this certificate; run `chmod 600 {key_path}`")


def no_passphrase() -> bytes:
    """`password` callback for `load_cert_chain`: never prompt on the terminal."""
    raise ValueError("the private key is encrypted: give an unencrypted key")

"""Fourth review (TLS identities): what a certificate's names can forge.

One real gateway (TLS listener, SoftHSMv2) and raw TLS clients whose certificates are
made here with `cryptography`:

* SAN-only certificates (empty subject, as SPIFFE's): every one of a CA was the one
  identity ``cert:``, so two tenants that rules tell apart by SAN shared owned objects
  (and mapped PINs, lock-outs, quotas). Each is now its own identity, keyed by its SANs.
* RFC 4514 injection: a certificate whose CN alone is ``evil,O=Team A`` (written
  ``CN=evil\\,O=Team A``) matched the pattern ``CN=*,O=Team A`` (fnmatch's ``*`` took the
  escaping backslash) and got Team A's officer rule.
* A certificate OpenSSL verifies but `cryptography` does not parse (BER where DER is
  due): the exception escaped connection_made and each such client dumped a traceback
  into the log, past its format and the refusal rate limit. Now one record, refused.
  One whose SAN Python's `ssl` cannot decode fails the handshake inside the event loop,
  whose report went to stderr as raw lines (not the log format); now a JSON record.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.adversarial.hostile import CKF_RW, CKF_SERIAL, CKO_DATA, CKU_USER, b, call, s, u
from tests.adversarial.tls_pki import Authority, _pem, _write_key, issue_named, patched
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.remote.tls_setup import free_port, stop_checked
from tests.softhsm import make_token

from p11gate.identity import Identity

CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0, 1, 2, 3
SPIFFE_A = "spiffe://example/team-a/app"
SPIFFE_B = "spiffe://example/team-b/app"


def _cn(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, v) for oid, v in parts])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("certnames")
    pki = base / "pki"
    pki.mkdir()
    ca = Authority("Clients CA A")
    (pki / "ca.pem").write_bytes(_pem(ca.cert))
    server, skey = ca.issue("gateway", server=True)
    (pki / "server.pem").write_bytes(_pem(server))
    _write_key(skey, pki / "server.key")
    empty = x509.Name([])
    certs = {
        "spiffe-a": issue_named(ca, empty, [x509.UniformResourceIdentifier(SPIFFE_A)],
                                pki, "spiffe-a"),
        "spiffe-b": issue_named(ca, empty, [x509.UniformResourceIdentifier(SPIFFE_B)],
                                pki, "spiffe-b"),
        # the CA lets a requester choose its CN; only this one is Team A's
        "team-a": issue_named(ca, _cn((NameOID.ORGANIZATION_NAME, "Team A"),
                                      (NameOID.COMMON_NAME, "x")), [], pki, "team-a"),
        "injected": issue_named(ca, _cn((NameOID.COMMON_NAME, "evil,O=Team A")), [],
                                pki, "injected"),
    }
    token = make_token(base / "softhsm", label="t", keys=False)
    port = free_port()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = ["unix:path={base / 'gw.sock'}", "tls:127.0.0.1:{port}"]
state_dir = "{base / 'state'}"
log_format = "json"

[tls]
cert = "{pki / 'server.pem'}"
key = "{pki / 'server.key'}"
client_ca = "{pki / 'ca.pem'}"

[[backend]]
name = "softhsm"
module = "{token['module']}"
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "t"
backend = "softhsm"
select = {{ label = "t" }}

[[rule]]
name = "team-a-org"
subject = ["CN=*,O=Team A"]
tokens = ["t"]
role = "officer"

[[rule]]
name = "spiffe-a"
san = ["URI:spiffe://example/team-a/*"]
tokens = ["t"]
namespace = {{ owned = true }}

[[rule]]
name = "spiffe-b"
san = ["URI:spiffe://example/team-b/*"]
tokens = ["t"]
namespace = {{ owned = true }}
""")
    g = Gateway(cfg)
    yield {"gw": g, "port": port, "ca": pki / "ca.pem", "certs": certs, "authority": ca,
           "dir": pki}
    stop_checked(g)


def connect(gw: dict[str, Any], client: str) -> RawClient:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=gw["ca"])
    files = gw["certs"][client]
    ctx.load_cert_chain(files["cert"], files["key"])
    raw = socket.create_connection(("127.0.0.1", gw["port"]), timeout=10)
    c = RawClient(None, sock=ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
    c.initialize()
    return c


def slots(c: RawClient) -> list[int]:
    (found,) = call(c, "C_GetSlotList", 1, 8)
    return list(found)


def test_san_only_certificates_are_distinct_identities(gw: dict[str, Any]) -> None:
    a = connect(gw, "spiffe-a")
    (slot,) = slots(a)
    (sa,) = call(a, "C_OpenSession", slot, CKF_SERIAL | CKF_RW)
    call(a, "C_Login", sa, CKU_USER, b"1234")
    label = b"team-a-only"
    call(a, "C_CreateObject", sa, [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, True),
                                   b(CKA_PRIVATE, False), s(CKA_LABEL, label)])
    assert len(a.find(sa, [s(CKA_LABEL, label)])) == 1
    # tenant B: another SPIFFE id of the same CA, in a namespace of its own. It used to
    # be the same identity (cert:) as A, owner of A's object
    bb = connect(gw, "spiffe-b")
    (slot_b,) = slots(bb)
    (sb,) = call(bb, "C_OpenSession", slot_b, CKF_SERIAL)
    assert bb.find(sb, [s(CKA_LABEL, label)]) == []
    assert bb.find(sb, [u(CKA_CLASS, CKO_DATA)]) == []
    a.close()
    bb.close()
    # the log says which SAN-only certificate each connection was
    peers = [r.get("peer", "") for r in gw["gw"].records() if r.get("msg") == "client connected"]
    assert any(p.endswith(f"cert= san=URI:{SPIFFE_A}") or f"san=URI:{SPIFFE_A} from" in p
               for p in peers), peers
    # and its identity key (mapped PINs) is its SANs
    ident = Identity(kind="tls", subject="", sans=(f"URI:{SPIFFE_B}", "DNS:a,b"),
                     ca_index=0)
    assert ident.key == f"cert:DNS:a\\,b,URI:{SPIFFE_B}"


def test_an_escaped_comma_in_a_cn_is_not_a_separator(gw: dict[str, Any]) -> None:
    good = connect(gw, "team-a")  # CN=x,O=Team A: the rule is Team A's
    assert len(slots(good)) == 1
    good.close()
    bad = connect(gw, "injected")  # CN=evil\,O=Team A: one CN, no O at all
    assert slots(bad) == []
    bad.close()
    assert wait_for(lambda: any("cert=CN=evil\\,O=Team A" in str(r.get("peer"))
                                for r in gw["gw"].records()))


def test_a_certificate_that_is_not_der_is_refused_in_one_record(gw: dict[str, Any]) -> None:
    ca, d = gw["authority"], gw["dir"]
    cert, key = ca.issue("ber")
    # BasicConstraints' "critical" BOOLEAN as 0x01: BER, which OpenSSL accepts
    (d / "ber.pem").write_bytes(patched(ca, cert, b"\x01\x01\xff", b"\x01\x01\x01"))
    _write_key(key, d / "ber.key")
    gw["certs"]["ber"] = {"cert": d / "ber.pem", "key": d / "ber.key"}
    for _ in range(3):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=gw["ca"])
        ctx.load_cert_chain(d / "ber.pem", d / "ber.key")
        raw = socket.create_connection(("127.0.0.1", gw["port"]), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as t:
            t.sendall(b"\0")
            assert t.recv(16) == b""  # closed: no RPC version byte, no service
    g = gw["gw"]
    assert wait_for(lambda: len([r for r in g.records() if r.get("msg") ==
                                 "TLS client refused: its certificate does not parse as DER"])
                    == 3), g.log()[-2000:]
    # every line of the log is a JSON record: no traceback around the format
    assert [ln for ln in g.log().splitlines() if not ln.startswith("{")] == []
    assert g.alive()


def test_a_san_python_cannot_decode_fails_in_log_records(gw: dict[str, Any]) -> None:
    ca, d = gw["authority"], gw["dir"]
    files = issue_named(ca, _cn((NameOID.COMMON_NAME, "badsan")),
                        [x509.DNSName("aaa.example")], d, "badsan")
    raw_cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    # the DNS name's IA5String gets a byte beyond ASCII: OpenSSL verifies it, Python's
    # getpeercert() (called by the event loop at the end of the handshake) cannot decode it
    files["cert"].write_bytes(patched(ca, raw_cert, b"aaa.example", b"a\xffa.example"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=gw["ca"])
    ctx.load_cert_chain(files["cert"], files["key"])
    raw = socket.create_connection(("127.0.0.1", gw["port"]), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as t:
        t.sendall(b"\0")
        assert t.recv(16) == b""
    g = gw["gw"]
    assert wait_for(lambda: any(r.get("logger") == "asyncio" for r in g.records())), \
        g.log()[-2000:]
    assert [ln for ln in g.log().splitlines() if not ln.startswith("{")] == []
    assert g.alive()


"""What the TLS tests set up the same way: a throw-away PKI (tests/remote/pki.py) and a
SoftHSM token (tests/softhsm.py) in one directory, a free TCP port for the gateway's TLS
listener, the gateway's configuration, and raw TLS clients of it."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.gateway_proc import Gateway, RawClient
from tests.remote.pki import make_pki
from tests.softhsm import make_token

from p11gate.codec import (
    HANDSHAKE,
    V0241,
    Attribute,
    ReplyError,
    build_frame,
    ckr,
    encode_request,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsSetup:
    """The PKI's files (make_pki), the token (make_token) and the port for the gateway."""

    base: Path
    pki: dict[str, Path]
    token: dict[str, Any]
    port: int


def tls_setup(base: Path) -> TlsSetup:
    """A PKI in ``base/pki``, a token in ``base/softhsm`` and a free port."""
    pki = make_pki(base / "pki")
    token = make_token(base / "softhsm")
    return TlsSetup(base=base, pki=pki, token=token, port=free_port())


def open_config(base: Path, token: dict[str, Any], pki: dict[str, Path], port: int) -> Path:
    """A gateway with a TLS listener and no rules: every verified client may use the
    token's keys (the make_token EC key, id 01)."""
    base.mkdir(parents=True, exist_ok=True)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = ["unix:path={base / 'gw.sock'}", "tls:127.0.0.1:{port}"]
state_dir = "{base / 'state'}"
log_format = "json"

[tls]
cert = "{pki['server.pem']}"
key = "{pki['server.key']}"
client_ca = "{pki['ca']}"
crl = "{pki['crl']}"

[[backend]]
name = "softhsm"
module = "{token['module']}"
env = {{ SOFTHSM2_CONF = "{token['conf']}" }}

[[token]]
name = "signing"
backend = "softhsm"
select = {{ label = "{token['label']}" }}
""")
    return cfg


#: the rules of gateway_config: each tenant's certificate gets the token, in a namespace
#: of its own; uid 0 on the unix socket is an officer of every token
TENANT_RULES = """
[[rule]]
name = "tenant-a"
subject = ["CN=tenant-a,*"]
tokens = ["signing"]
namespace = { owned = true }

[[rule]]
name = "tenant-b"
san = ["DNS:tenant-b.clients.example"]
tokens = ["signing"]
namespace = { owned = true }

[[rule]]
name = "local-admin"
uid = [0]
tokens = ["*"]
role = "officer"
"""


def gateway_config(base: Path, token: dict[str, Any], pki: dict[str, Path], port: int) -> Path:
    """open_config with TENANT_RULES."""
    cfg = open_config(base, token, pki, port)
    cfg.write_text(cfg.read_text() + TENANT_RULES)
    return cfg


def stop_checked(gw: Gateway) -> None:
    """Stop a fixture's gateway; fail (with its log's end) if it had died meanwhile."""
    alive = gw.alive()
    gw.stop()
    assert alive, gw.log()[-3000:]


def tls_socket(pki: dict[str, Path], port: int, client: str | None,
               tls12: bool = False) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki["ca"])
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        ctx.load_cert_chain(pki[f"{client}.pem"], pki[f"{client}.key"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def refused(pki: dict[str, Path], port: int, client: str | None, tls12: bool = False) -> bool:
    """True if the gateway serves this client no RPC reply at all."""
    try:
        s = tls_socket(pki, port, client, tls12)
        s.sendall(b"\x00" + build_frame(1, encode_request(1, [HANDSHAKE, 0, b"\0"], V0241),
                                        b"client"))
        data = s.recv(64)
        return data == b""
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def tls_signer(pki: dict[str, Path], port: int, client: str,
               pin: bytes = b"1234") -> tuple[RawClient, int, int]:
    """A raw TLS client of ``client``'s certificate, logged in on a read-write session,
    and the handle of the make_token EC private key (CKA_ID 01): sign with
    tests.gateway_proc.sign."""
    c = RawClient(None, sock=tls_socket(pki, port, client))
    c.initialize()
    (slots,) = c.call(4, [1, 8])  # C_GetSlotList
    (sess,) = c.call(10, [slots[0], 6])  # C_OpenSession, serial + read-write
    try:
        c.call(18, [sess, 1, pin])  # C_Login as the user
    except ReplyError as e:
        assert e.rv == ckr.USER_ALREADY_LOGGED_IN
    c.call(26, [sess, [Attribute(0, 3, 8), Attribute(0x102, b"\x01", 1)]])
    (found,) = c.call(27, [sess, 4])
    c.call(28, [sess])
    assert len(found) == 1
    return c, sess, found[0]

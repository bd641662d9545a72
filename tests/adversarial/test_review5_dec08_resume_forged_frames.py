"""Fifth review (resumption): what a tenant gets by sending, from a plain TLS client,
what the agent sends when it resumes an application on another node. Probes that were
found sound, kept as regression tests against a real gateway node.

A node has no resume path: the agent rebuilds an application with ordinary calls
(C_Initialize, C_OpenSession, C_Login with the PIN it kept, C_FindObjects by
fingerprint, the operation's Init and Updates again). Its frames carry the options
``p11gate-agent``, which the node ignores like any client's; the gateway's private
chain frames (``p11gate-chain``) are run only by its workers, never read from a client.
So the "resume frames" of tenant B are tenant B's calls: other tenants' session and
object handles, replayed Updates or an "already logged in" state give it nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tests.adversarial.hostile as hs
from tests.gateway_proc import Gateway, RawClient
from tests.remote.tls_setup import gateway_config, stop_checked, tls_setup, tls_socket

from p11gate.codec import (
    V0241,
    AttrRequest,
    Mechanism,
    build_frame,
    ckr,
    decode_reply,
    encode_request,
)
from p11gate.codec.chains import CHAIN_OPTIONS, encode_chain
from p11gate.remote.node_link import OPTIONS as AGENT_OPTIONS


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    s = tls_setup(tmp_path_factory.mktemp("forged"))
    gw = Gateway(gateway_config(s.base / "gw", s.token, s.pki, s.port))
    yield {"pki": s.pki, "port": s.port, "gw": gw}
    stop_checked(gw)


def client(node: dict[str, Any], who: str) -> RawClient:
    c = RawClient(None, sock=tls_socket(node["pki"], node["port"], who))
    c.initialize()
    return c


def rw_session(c: RawClient) -> int:
    (slots,) = hs.call(c, "C_GetSlotList", 1, 8)
    (sess,) = hs.call(c, "C_OpenSession", slots[0], hs.CKF_SERIAL | hs.CKF_RW)
    return int(sess)


def raw_call(c: RawClient, call_id: int, args: list[Any], options: bytes) -> Any:
    c.code += 1
    c.send_raw(build_frame(c.code, encode_request(call_id, args, V0241), options))
    return c.recv_frame()


def test_agent_and_chain_options_from_a_client_are_ignored(node: dict[str, Any]) -> None:
    b = client(node, "tenant-b")
    plain = raw_call(b, hs.ID("C_GetSlotList"), [1, 8], b"")
    agent = raw_call(b, hs.ID("C_GetSlotList"), [1, 8], AGENT_OPTIONS)
    assert plain is not None and agent is not None and plain[1] == agent[1]
    # a chain of the gateway's own worker protocol is not run as one
    b.code += 1
    chain = encode_chain([encode_request(hs.ID("C_GetSlotList"), [1, 8], V0241)] * 2)
    b.send_raw(build_frame(b.code, chain, CHAIN_OPTIONS))
    frame = b.recv_frame()
    if frame is not None:  # answered as one (bad) request, never as a chain's replies
        with pytest.raises(Exception):  # noqa: B017 - an error reply or no decode at all
            decode_reply(frame[1], V0241, hs.ID("C_GetSlotList"), [1, 8])


def test_another_tenants_handles_and_login_are_not_resumed_by_naming_them(
        node: dict[str, Any]) -> None:
    a = client(node, "tenant-a")
    sa = rw_session(a)
    assert hs.rv(a, "C_Login", sa, hs.CKU_USER, b"1234") in (ckr.OK,
                                                             ckr.USER_ALREADY_LOGGED_IN)
    (key,) = hs.call(a, "C_GenerateKey", sa, Mechanism(hs.CKM_AES_KEY_GEN, None),
                     hs.aes_template("a-only", b"\xa1"))
    b = client(node, "tenant-b")
    # A's session number, as an agent replaying A's state would send it
    assert hs.rv(b, "C_GetSessionInfo", sa) == ckr.SESSION_HANDLE_INVALID
    assert hs.rv(b, "C_EncryptInit", sa, Mechanism(hs.CKM_AES_ECB, None), key) \
        == ckr.SESSION_HANDLE_INVALID
    sb = rw_session(b)
    # the backend is logged in (A): B's session is not, and claims nothing by acting so
    state = hs.call(b, "C_GetSessionInfo", sb)[1]
    assert state == hs.CKS_RW_PUBLIC
    assert hs.rv(b, "C_Logout", sb) == ckr.USER_NOT_LOGGED_IN
    assert hs.rv(b, "C_Login", sb, 2, b"") == ckr.USER_NOT_LOGGED_IN
    assert hs.rv(b, "C_Login", sb, hs.CKU_USER, b"not-the-pin") == ckr.PIN_INCORRECT
    # A's object handle, and a replayed Init/Update with it, in B's own session
    for h in range(1, 40):
        assert hs.rv(b, "C_EncryptInit", sb, Mechanism(hs.CKM_AES_ECB, None), h) in (
            ckr.KEY_HANDLE_INVALID, ckr.OBJECT_HANDLE_INVALID), h
    assert hs.rv(b, "C_EncryptUpdate", sb, b"\0" * 16, 64) == ckr.OPERATION_NOT_INITIALIZED
    # B, logged in with the PIN, still finds and reaches nothing of A's (owned namespace)
    assert hs.rv(b, "C_Login", sb, hs.CKU_USER, b"1234") == ckr.OK
    hs.call(b, "C_FindObjectsInit", sb, [hs.s(hs.CKA_LABEL, "a-only")])
    assert hs.call(b, "C_FindObjects", sb, 8) == [[]]
    hs.call(b, "C_FindObjectsFinal", sb)
    assert hs.rv(b, "C_GetAttributeValue", sb, key, [AttrRequest(hs.CKA_LABEL, 64)]) in (
        ckr.OBJECT_HANDLE_INVALID, ckr.ARGUMENTS_BAD)

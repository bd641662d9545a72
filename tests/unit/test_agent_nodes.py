"""The agent's choice of node (fewest connections among the healthy, back-off for the
failed ones), its PIN keeping, and its call description checked against the codec's
call table."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from p11gate.codec import CALLS
from p11gate.remote import nodes
from p11gate.remote import resume_calls as rc
from p11gate.remote.nodes import BACKOFF_FIRST, BACKOFF_MAX, NodeSet
from p11gate.remote.resume_state import Handles, Login, Operation, Session


def nodeset(n: int) -> NodeSet:
    return NodeSet([f"tls:127.0.0.1:{9000 + i}" for i in range(n)],
                   ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), 1.0)


def test_fewest_connections_first_then_round_robin_among_equals() -> None:
    ns = nodeset(3)
    firsts = []
    for _ in range(6):
        best = ns.order()[0]
        best.active += 1
        firsts.append(best.address[-1])
    assert sorted(firsts) == ["0", "0", "1", "1", "2", "2"]
    ns.nodes[2].active = 0
    assert ns.order()[0] is ns.nodes[2]
    for node in ns.nodes:
        node.active = 0
    assert len({ns.order()[0].address for _ in range(3)}) == 3  # equals: round robin


def test_failed_node_goes_last_with_doubling_backoff_and_comes_back() -> None:
    ns = nodeset(2)
    bad = ns.nodes[0]
    delays = []
    for _ in range(9):
        ns.mark_down(bad, "refused")
        delays.append(bad.down_until)
    assert all(ns.order()[0] is ns.nodes[1] for _ in range(4))
    assert ns.order()[-1] is bad  # still tried when every other node fails
    gaps = [d - delays[0] for d in delays]
    assert gaps[1] == pytest.approx(BACKOFF_FIRST, abs=0.1)
    assert max(gaps) <= BACKOFF_MAX
    ns.mark_up(bad)
    assert bad.healthy(0.0) and bad.failures == 0
    ns.nodes[1].active = 1
    assert ns.order()[0] is bad


def test_a_burst_of_connections_spreads_over_the_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection made, then seven applications connecting at once (the node-death
    test's clients): the handshakes in progress count, so the seven do not all go to
    the node that had none yet."""
    async def slow_handshake(address: str, ctx: ssl.SSLContext, timeout: float) -> Any:
        await asyncio.sleep(0.05)
        return None, None

    monkeypatch.setattr(nodes, "tls_connect", slow_handshake)
    ns = nodeset(2)

    async def burst() -> None:
        await ns.connect()
        await asyncio.gather(*(ns.connect() for _ in range(7)))

    asyncio.run(burst())
    assert [n.active for n in ns.nodes] == [4, 4]


def test_excluded_node_is_the_last_resort() -> None:
    ns = nodeset(3)
    for _ in range(3):
        assert ns.order(exclude=ns.nodes[1])[-1] is ns.nodes[1]


def test_login_hides_and_overwrites_the_pin() -> None:
    h = Handles()
    h.add_session(Session(slot=1, flags=6, node=5))
    h.logins[1] = login = Login(1, b"123456")
    kept = login._pin
    assert "123456" not in repr(login) and "123456" not in repr(h.logins)
    h.drop_session(1)  # the slot's last session ends its login
    assert 1 not in h.logins and bytes(kept) == b"\0" * 6


def test_operation_buffer_bound_and_output_updates_make_it_unresumable() -> None:
    sign = next(k for k in rc.OP_KINDS if k.name == "sign")
    op = Operation(sign, [1, None, 2])
    op.add_update(44, [1, b"x" * 10])
    assert op.resumable and op.buffered == 10
    op.add_update(44, [1, b"x" * (17 * 1024 * 1024)])
    assert not op.resumable and not op.updates
    enc = next(k for k in rc.OP_KINDS if k.name == "encrypt")
    op = Operation(enc, [1, None, 2])
    op.add_update(31, [1, b"x", 16])
    assert not op.resumable


def test_call_description_matches_the_codec_signatures() -> None:
    """Handles sit where the table says: an object handle argument is a ``u`` and the
    first argument of a session call is the ``u`` session."""
    for call_id, positions in rc.OBJECT_ARGS.items():
        codes = CALLS[call_id].req_codes
        for pos, _ in positions:
            assert codes[pos] == "u", CALLS[call_id].name
    for call_id, positions in rc.OBJECT_REPLIES.items():
        assert all(CALLS[call_id].rep_codes[p] == "u" for p in positions)
    for call in CALLS[11:88]:
        if call.id not in rc.SLOT_CALLS:
            assert call.req_codes[0] == "u", call.name
    # the calls taking a slot (or flags), not a session, as their first argument
    names = {CALLS[i].name for i in rc.SLOT_CALLS}
    assert names == {"C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList",
                     "C_GetMechanismInfo", "C_InitToken", "C_OpenSession",
                     "C_CloseAllSessions", "C_WaitForSlotEvent", "C_InitToken2"}
    for kind in rc.OP_KINDS:
        assert CALLS[kind.init].name.endswith("Init")
        assert all("Update" in CALLS[c].name or c == 40 for c in kind.updates)

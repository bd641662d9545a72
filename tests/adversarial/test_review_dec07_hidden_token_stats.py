"""Review 2026-12-07: a tenant's calls naming a token it may not see move nothing of
that token. Slot calls (C_GetSlotInfo, C_OpenSession, ...) on a slot id outside the
tenant's grants are refused with CKR_SLOT_ID_INVALID, as for a slot that does not
exist; they were nonetheless counted on the hidden token's `status` figures and its
Prometheus series, so a tenant could raise another token's error rate (an alert, a
paging operator) with calls it may not make. Raw frames, from uid 1001."""

from __future__ import annotations

from typing import Any

from tests.adversarial.test_isolation import A, env  # noqa: F401  (fixture)
from tests.policy.tenants import as_uid, raw, slot_of

from p11gate.admin import query
from p11gate.codec import ReplyError, ckr

C_GetSlotInfo, C_OpenSession = 5, 10
FLOOD_CALLS = 40


def _probe(path: str, slot: int) -> list[int]:
    c = raw(path)
    rvs = []
    for _ in range(FLOOD_CALLS):
        for call_id, args in ((C_GetSlotInfo, [slot]), (C_OpenSession, [slot, 4])):
            try:
                c.call(call_id, args)
                rvs.append(ckr.OK)
            except ReplyError as e:
                rvs.append(e.rv)
    c.close()
    return rvs


def _stats(admin: str, name: str) -> dict[str, Any]:
    (t,) = [t for t in query(admin)["tokens"] if t["name"] == name]
    return dict(t["stats"])


def test_calls_on_a_hidden_slot_do_not_count_on_its_token(env: dict[str, Any]) -> None:  # noqa: F811
    gw = env["gw"]
    admin = str(env["base"] / "state" / "admin.sock")
    officer = raw(gw.path)
    hidden = slot_of(officer, "pt")  # team-a's rule grants only "shared"
    officer.close()
    before = _stats(admin, "pt")
    rvs = as_uid(A, _probe, gw.path, hidden)
    assert rvs == [ckr.SLOT_ID_INVALID] * (2 * FLOOD_CALLS)
    assert _stats(admin, "pt") == before
    # the officer's own call on it still counts: the figures are live
    officer = raw(gw.path)
    officer.call(C_GetSlotInfo, [hidden])
    officer.close()
    assert _stats(admin, "pt")["calls"] == before["calls"] + 1

"""What a member's failures mean: which results say the member (not the request) is
broken, what is asked again, and the rule that bounds what one client call may cost the
pool in missed deadlines. Kept apart from :mod:`.member` so that the rules read as one
list (member.py re-exports these names)."""

from __future__ import annotations

from ...codec import ckr
from ...codec.call_table import CallId
from ...errors import Pkcs11Error

#: the latency estimate of a member that has answered nothing yet (seconds)
INITIAL_LATENCY = 0.0005

#: call name → call id (the codec's CallId enum, indexed by name)
ID = CallId.__members__

#: results that say "this member (or its session) is broken", not "this request is
#: wrong". CKR_GENERAL_ERROR and CKR_DEVICE_MEMORY are not among them: modules give them
#: for a client's malformed or oversized input (SoftHSM: a C_Decrypt of garbage), and one
#: client's bad request must not take members down and be retried on the others
DEVICE_ERRORS = frozenset({
    ckr.DEVICE_ERROR, ckr.DEVICE_REMOVED, ckr.TOKEN_NOT_PRESENT,
    ckr.TOKEN_NOT_RECOGNIZED, ckr.CRYPTOKI_NOT_INITIALIZED,
})
#: what a module answers when a query or a login broke down inside it rather than because
#: of the request: SoftHSM's file store, read by one process while another (a second
#: gateway node's worker on the same token) rewrites it, fails a C_GetTokenInfo or a
#: C_Login now and then with CKR_GENERAL_ERROR -- before it looks at the PIN -- and
#: answers the same call a moment later. The pool asks again (another member first, for
#: a query) instead of passing the error on; it is the answer only after the last attempt
BROKE_DOWN = frozenset({ckr.GENERAL_ERROR})
#: attempts of a slot or token query (rounds over the usable members) or of one member's
#: login, before the module's CKR_GENERAL_ERROR is the answer
BROKE_DOWN_ATTEMPTS = 3
#: seconds, at most, between two attempts (random: two racing processes fall out of step)
BROKE_DOWN_PAUSE = 0.05
#: a session the module no longer knows: the member is broken only when it is the
#: control session; a leased one is dropped by the pool (a client's own calls can end
#: one, so these must not take members down and be retried elsewhere)
SESSION_GONE = frozenset({ckr.SESSION_CLOSED, ckr.SESSION_HANDLE_INVALID})

#: how long "this object is not on that member" is believed, seconds
MISSING_TTL = 5.0
#: seconds between a lease waiter's attempts to take a session back from an operation
#: that sits idle on it (see :meth:`Member.lease`)
RECLAIM_POLL = 0.2


#: a call that misses its deadline blames the call, not the member, when the member
#: answered something after the call had run this share of its deadline (see
#: Member._failure); the liveness probe asks a member with calls under way and no
#: answer for a few of these shares (LIVENESS_PROBES per deadline)
ALIVE_AFTER = 0.25
LIVENESS_PROBES = 8


class MemberDown(Exception):
    """The member failed in a way that moves work to another member. ``deadline``: the
    failure was a missed deadline (see :func:`deadline_strike`)."""

    def __init__(self, reason: str, deadline: bool = False) -> None:
        super().__init__(reason)
        self.deadline = deadline


def deadline_strike(e: MemberDown, missed: bool) -> bool:
    """The rule that bounds what one client call may cost the pool: a call (or an
    operation) may miss its deadline on one member and go on to the next, never on a
    second. ``missed``: it has missed one already; returns whether it has now. Raises
    CKR_DEVICE_ERROR for the second: twice past the deadline on two members, the call
    is slow (its data, mechanism or key are the client's to choose), not the members
    hung, and trying it on the others would kill each one's worker in turn."""
    if not e.deadline:
        return missed
    if missed:
        raise Pkcs11Error(ckr.DEVICE_ERROR, "call missed its deadline on two members "
                          "(not retried on another member)")
    return True

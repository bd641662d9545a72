"""The frontend's handle tables agree with the call signatures (a handle position that
is not a ``u`` of the request, or past its end, once closed a client's connection)."""

from __future__ import annotations

from p11gate.codec.calls import CALLS, CALLS_BY_NAME
from p11gate.frontend.tables import KEY_ARGS, OBJECT_ARGS, TEMPLATE_ARGS


def test_every_handle_position_is_a_ulong_of_the_request() -> None:
    for call_id, positions in OBJECT_ARGS.items():
        codes = CALLS[call_id].req_codes
        for pos in positions:
            assert pos < len(codes) and codes[pos] == "u", (CALLS[call_id].name, pos, codes)


def test_key_roles_are_handle_positions() -> None:
    for call_id, pos in KEY_ARGS:
        assert pos in OBJECT_ARGS[call_id], CALLS[call_id].name
    # C_SetOperationState(session, state, encryption key, authentication key)
    assert OBJECT_ARGS[CALLS_BY_NAME["C_SetOperationState"].id] == (2, 3)
    # objects, not keys, in the object calls
    for name in ("C_GetAttributeValue", "C_DestroyObject", "C_CopyObject"):
        assert (CALLS_BY_NAME[name].id, 1) not in KEY_ARGS


def test_template_positions_are_templates() -> None:
    for call_id, positions in TEMPLATE_ARGS.items():
        assert all(CALLS[call_id].req_codes[p] == "aA" for p in positions)

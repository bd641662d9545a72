"""Where handles sit in each call's arguments and replies, by call id: the frontend's
views of the codec's call table (:mod:`p11gate.codec.call_table`), nothing written here.

The dispatcher itself reads ``PLANS[call_id]``; these dicts and sets remain for the
modules that ask one question of many calls (precedence, quotas, fail-closed, stats).
"""

from __future__ import annotations

from ..codec.call_table import PLANS, Phase, ids_where

SLOT_CALLS = ids_where(lambda p: p.slot)
SESSION_CALLS = ids_where(lambda p: p.session)
OBJECT_ARGS: dict[int, tuple[int, ...]] = {
    p.call.id: p.object_args for p in PLANS if p.object_args}
KEY_ARGS: dict[tuple[int, int], int] = {
    (p.call.id, pos): code for p in PLANS
    for pos, code in zip(p.object_args, p.unknown_handle_codes, strict=True)
    if code is not None}
OPTIONAL_OBJECT_ARGS = ids_where(lambda p: p.optional_objects)
MECHANISM_CALLS = ids_where(lambda p: p.mechanism_arg is not None)
NEW_OBJECTS: dict[int, tuple[int, ...]] = {
    p.call.id: p.new_objects for p in PLANS if p.new_objects}
CREATE_TEMPLATES: dict[int, tuple[int, ...]] = {
    p.call.id: p.create_templates for p in PLANS if p.create_templates}
CAPACITY_ARGS: dict[int, tuple[tuple[int, int], ...]] = {
    p.call.id: p.capacity_args for p in PLANS if p.capacity_args}
ATTR_REQUEST_ARG: dict[int, int] = {
    p.call.id: p.attr_request_arg for p in PLANS if p.attr_request_arg is not None}
RELAYABLE_REPLIES = ids_where(lambda p: p.relayable)
KEY_USE = ids_where(lambda p: p.key_use)
TEMPLATE_ARGS: dict[int, tuple[int, ...]] = {
    p.call.id: p.template_args for p in PLANS if p.template_args}
#: the operation a key given to each call is bound to (*Init with a key, C_DigestKey)
OPERATION_OF_INIT: dict[int, str] = {
    p.call.id: p.key_operation for p in PLANS if p.key_operation is not None}
#: the operations each call continues (single-part, update, final, per-message)
OPERATION_PHASES: dict[int, tuple[str, ...]] = {
    p.call.id: p.operations for p in PLANS
    if p.phase not in (Phase.INIT, Phase.NONE) and p.operations}

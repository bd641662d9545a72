"""PKCS#11 session rules a pool must apply itself, because its member sessions are not
the client's: they are all read/write, shared between logical sessions, and outlive
them. What the module would check on the client's own session is checked here.
"""

from __future__ import annotations

from typing import Any

from ...codec import ckr
from ...codec import constants as ck
from ...codec.call_table import PLANS, CallId, ids_where
from ...errors import Pkcs11Error

#: request positions of the templates of the calls that make objects
CREATE_TEMPLATES: dict[int, tuple[int, ...]] = {
    p.call.id: p.create_templates for p in PLANS if p.create_templates}
#: calls that change or destroy the object at request position 1
OBJECT_WRITES = ids_where(lambda p: p.replication == "everywhere")

_DIGEST_KEY = CallId["C_DigestKey"]


def keeps_operation(call_id: int, rv: int) -> bool:
    """Whether the operation goes on after ``call_id`` failed with ``rv``: after an
    output-size answer (PKCS#11), and after C_DigestKey was refused for its key handle
    (the module looks the key up before it touches the operation: SoftHSM does, and so
    the plain gateway token behaves; the gateway's probe of a module's answer, with
    handle 0, lands here too). Any other error ends it, CKR_USER_NOT_LOGGED_IN of a key
    still wanting its context-specific login included (as SoftHSM does)."""
    if rv == ckr.BUFFER_TOO_SMALL:
        return True
    return call_id == _DIGEST_KEY and rv in (ckr.KEY_HANDLE_INVALID, ckr.OBJECT_HANDLE_INVALID)



def template_token(template: Any) -> bool | None:
    """CKA_TOKEN of a template: True, False, or None when the template does not say."""
    if not isinstance(template, list):
        return None
    for a in template:
        if getattr(a, "type", None) == ck.CKA_TOKEN and a.length is not None:
            return bool(a.value)
    return None


def new_objects_on_token(call_id: int, args: list[Any], source_is_token: bool) -> list[bool]:
    """For each object the call makes, whether it is a token object (PKCS#11 default:
    a session object; a copy keeps its original's CKA_TOKEN unless the template says)."""
    out = []
    for pos in CREATE_TEMPLATES.get(call_id, ()):
        v = template_token(args[pos]) if pos < len(args) else None
        if v is None:
            v = source_is_token if call_id == CallId["C_CopyObject"] else False
        out.append(v)
    return out


def check_read_only(flags: int, call_id: int, args: list[Any],
                    is_token_object: bool) -> None:
    """CKR_SESSION_READ_ONLY for a write of token objects on a read-only session, as the
    module gives it (``is_token_object``: the object at position 1 is a token object)."""
    if flags & ck.CKF_RW_SESSION:
        return
    if call_id in OBJECT_WRITES and is_token_object:
        raise Pkcs11Error(ckr.SESSION_READ_ONLY)
    if any(new_objects_on_token(call_id, args, is_token_object)):
        raise Pkcs11Error(ckr.SESSION_READ_ONLY)

#: calls that copy, change or destroy the object at request position 1
OBJECT_WRITE_CALLS = OBJECT_WRITES | {CallId["C_CopyObject"]}

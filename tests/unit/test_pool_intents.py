"""Creation intents of gateway-replicated pools: the identities a call will create, and
the registry rows that outlive a crash (issue 10 point 8)."""

from __future__ import annotations

from pathlib import Path

from p11gate.backends.pool.intents import IntentLog
from p11gate.backends.pool.member import ID
from p11gate.backends.pool.objects import ObjectIds
from p11gate.backends.pool.reconcile import creation_keys
from p11gate.codec import Attribute
from p11gate.codec import constants as ck
from p11gate.registry import Registry


def A(t: int, v: object) -> Attribute:
    return Attribute(t, v, len(v) if isinstance(v, bytes) else 1)


def test_identities_come_from_the_templates_with_pkcs11_defaults(tmp_path: Path) -> None:
    objects = ObjectIds("ha", Registry(tmp_path))
    tok = A(ck.CKA_TOKEN, 1)
    pair = creation_keys(ID["C_GenerateKeyPair"], [
        1, None, [tok, A(ck.CKA_LABEL, b"k")], [tok, A(ck.CKA_ID, b"\x01")]], objects)
    assert pair == [(ck.CKO_PUBLIC_KEY, b"", b"k", None),
                    (ck.CKO_PRIVATE_KEY, b"\x01", b"", None)]
    # session objects get no intent (they die with the member's session)
    assert creation_keys(ID["C_GenerateKey"], [1, None, [A(ck.CKA_LABEL, b"s")]],
                         objects) == []
    data = creation_keys(ID["C_CreateObject"], [
        1, [tok, Attribute(ck.CKA_CLASS, ck.CKO_DATA, 8), A(ck.CKA_LABEL, b"d")]], objects)
    assert data == [(ck.CKO_DATA, None, b"d", None)]  # data objects have no CKA_ID
    source = objects.token_oid((ck.CKO_SECRET_KEY, b"\x02", b"aes", None))
    copy = creation_keys(ID["C_CopyObject"], [1, source, [A(ck.CKA_LABEL, b"aes2")]],
                         objects)
    assert copy == [(ck.CKO_SECRET_KEY, b"\x02", b"aes2", None)]


def test_an_intent_outlives_the_process_until_every_member_is_settled(
    tmp_path: Path,
) -> None:
    key = (ck.CKO_PRIVATE_KEY, b"\x01", b"k", None)
    log = IntentLog("ha", Registry(tmp_path))
    it = log.reserve([key], ["m0", "m1"])
    log.begin(it)
    done = log.reserve([(ck.CKO_PUBLIC_KEY, b"\x01", b"k", None)], ["m0", "m1"])
    log.begin(done)
    log.done(done)  # the client was told: nothing stays
    # the gateway dies here
    again = IntentLog("ha", Registry(tmp_path))
    assert again.found_at_start == 1
    (left,) = again.open.values()
    assert (left.keys, left.unsettled, left.state, left.live) == (
        [key], {"m0", "m1"}, "pending", False)
    assert again.unsettled_for([key]) == {"m0", "m1"}
    again.settle(left, "m0")
    again.settle(left, "m1")
    assert IntentLog("ha", Registry(tmp_path)).found_at_start == 0

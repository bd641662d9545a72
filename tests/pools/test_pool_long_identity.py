"""A pool reads an object's identity (CKA_CLASS, CKA_ID, CKA_LABEL) with 1024-byte
buffers first. A longer label came back "unavailable" and was taken for none, so an
object with a 1500-byte label got the identity -- and the pool id, and so the handles --
of another object with the same class and CKA_ID and no label. It is now read whole."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p11gate.backends.pool.identities import IDENTITY_MAX, read_key
from p11gate.backends.pool.pool import PoolBackend
from p11gate.codec import Attribute, AttrRequest, ckr
from p11gate.codec import constants as ck
from p11gate.errors import Pkcs11Error

LONG = b"L" * 1500


class _Member:
    """Answers C_GetAttributeValue as a module does: a value longer than the caller's
    buffer (or a size query) comes back unavailable or as its length."""

    control = 1

    def __init__(self, objects: dict[int, dict[int, Any]]) -> None:
        self.objects = objects
        self.calls = 0

    async def call(self, call_id: int, args: list[Any]) -> list[Any]:
        self.calls += 1
        obj = self.objects[args[1]]
        out = []
        for r in args[2]:
            assert isinstance(r, AttrRequest)
            v = obj.get(r.type)
            if v is None:
                out.append(Attribute(r.type, None, None))  # none
            elif isinstance(v, int):
                out.append(Attribute(r.type, v, 1 if r.type == ck.CKA_TOKEN else 8))
            elif r.length == 0:
                out.append(Attribute(r.type, None, len(v)))  # the size
            elif len(v) > r.length:
                out.append(Attribute(r.type, None, None))  # CKR_BUFFER_TOO_SMALL
            else:
                out.append(Attribute(r.type, v, len(v)))
        return [out, ckr.OK]


def _read(objects: dict[int, dict[int, Any]], handle: int) -> Any:
    pool = object.__new__(PoolBackend)
    pool.cfg = type("Cfg", (), {"identity": "attributes"})()  # type: ignore[assignment]
    return asyncio.run(read_key(pool, _Member(objects), handle))  # type: ignore[arg-type]


def test_a_long_label_is_part_of_the_identity() -> None:
    objects = {
        1: {ck.CKA_TOKEN: 1, ck.CKA_CLASS: 4, ck.CKA_ID: b"\x42\x42", ck.CKA_LABEL: b""},
        2: {ck.CKA_TOKEN: 1, ck.CKA_CLASS: 4, ck.CKA_ID: b"\x42\x42", ck.CKA_LABEL: LONG},
    }
    assert _read(objects, 1) == (4, b"\x42\x42", b"", None)
    assert _read(objects, 2) == (4, b"\x42\x42", LONG, None)
    assert _read(objects, 1) != _read(objects, 2)


def test_an_absent_attribute_stays_absent() -> None:
    objects = {3: {ck.CKA_TOKEN: 1, ck.CKA_CLASS: 0, ck.CKA_LABEL: b"data"}}  # no CKA_ID
    assert _read(objects, 3) == (0, None, b"data", None)


def test_an_identity_too_long_to_keep_fails_the_call() -> None:
    objects = {4: {ck.CKA_TOKEN: 1, ck.CKA_CLASS: 4, ck.CKA_ID: b"",
                   ck.CKA_LABEL: b"x" * (IDENTITY_MAX + 1)}}
    with pytest.raises(Pkcs11Error) as e:
        _read(objects, 4)
    assert e.value.rv == ckr.DEVICE_MEMORY


def test_a_session_object_has_no_identity() -> None:
    objects = {5: {ck.CKA_TOKEN: 0, ck.CKA_CLASS: 4, ck.CKA_LABEL: LONG}}
    assert _read(objects, 5) is None


def test_two_long_labelled_keys_through_a_real_pool_stay_two(tmp_path: Any) -> None:
    """The same through the gateway, on three SoftHSM members: two token keys with one
    CKA_ID and different 1500-byte labels are two objects to a find, each with its own
    label (before, both read as "no label", one pool id, one handle)."""
    from tests.pools.test_pool_reconcile import A, logged_in, start_pool

    _members, _cfg, gw = start_pool(tmp_path)
    try:
        c, sess = logged_in(gw)
        labels = [b"a" * 1500, b"b" * 1500]
        made = []
        for label in labels:
            (h,) = c.call(20, [sess, [A(0x0, 4), A(0x100, 0x1F), A(0x11, bytes(32)),
                                      A(0x1, True), A(0x102, b"4242"), A(0x3, label),
                                      A(0x2, True), A(0x103, True)]])
            made.append(h)
        found = c.find(sess, [A(0x102, b"4242")])
        assert len(set(found)) == 2, found
        got = []
        for h in found:
            attrs, _ = c.call(24, [sess, h, [AttrRequest(ck.CKA_LABEL, 2000)]])
            got.append(attrs[0].value)
        assert sorted(got) == labels
        c.close()
    finally:
        gw.stop()

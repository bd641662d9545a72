"""Fifth review (layered soft tokens): token objects per identity are bounded, on raw
frames of several uids.

Found: ``max_token_objects_per_identity`` counted an object identity (class, CKA_ID,
CKA_LABEL), not objects: an identity that gave every object the same label made any
number of them, and on a layered token (every identity's token has the configured
name) an object another identity had made with that identity was not counted at all.
The count also starts at 0 with every start of the gateway, while a layer 0 keeps its
objects: each restart gave an identity its quota again, in a file that stays open in
the gateway's memory. And one object may weigh some 400 KiB (attributes up to 64 KiB
each), so a count alone bounds little.

Now every object counts (per identity, whatever its identity attributes; a rename
moves the count with the object), and a layer 0 holds at most
``max_token_objects_per_identity`` objects and 32 MiB, counted in its file (so across
restarts, and cow copies too). Another identity is not affected by either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.adversarial.hostile import ID, b, s, u
from tests.gateway_proc import Gateway
from tests.policy.tenants import as_uid, find, raw, remove, shared_socket_dir, slot_of

from p11gate.codec import AttrRequest, ReplyError, ckr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be other uids)")

ADMIN, A, B, C = 1071, 1072, 1073, 1074
QUOTA = 100
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_VALUE, CKA_COPYABLE = 0x0, 0x1, 0x3, 0x11, 0x171
CKA_SUBJECT, CKA_ID, CKA_ISSUER, CKA_SERIAL_NUMBER = 0x101, 0x102, 0x81, 0x82
CKO_DATA, CKO_CERTIFICATE = 0, 1


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("layers-quota")
    for name, pin in (("so.pin", "layer-so-pin-5"), ("user.pin", "layer-user-pin-5")):
        (base / name).write_text(pin + "\n")
        (base / name).chmod(0o600)
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"
max_token_objects_per_identity = {QUOTA}

[[backend]]
name = "team"
type = "soft"
init_so_pin_file = "{base / 'so.pin'}"
init_user_pin_file = "{base / 'user.pin'}"
layers = [{{ name = "managed", path = "{base / 'managed.db'}" }}]
own_layer_dir = "{base / 'own'}"

[[token]]
name = "team"
backend = "team"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
own_layer = ["members"]
layers = [{{ layer = "managed", grant = [
    {{ rule = "admin", access = "rw" }},
    {{ rule = "members", access = "cow" }} ] }}]

[[rule]]
name = "admin"
uid = [{ADMIN}]
tokens = ["team"]

[[rule]]
name = "members"
uid = [{A}, {B}, {C}]
tokens = ["team"]
""")
    env = {"gw": Gateway(cfg), "cfg": cfg}
    try:
        yield env
    finally:
        env["gw"].stop()
        remove(sockdir)


def _rv(c: Any, name: str, *args: Any) -> int:
    try:
        c.call(ID(name), list(args))
    except ReplyError as e:
        return e.rv
    return ckr.OK


def _session(path: str) -> tuple[Any, int]:
    c = raw(path)
    (se,) = c.call(ID("C_OpenSession"), [slot_of(c, "team"), 6])
    c.call(ID("C_Login"), [se, 1, None])
    return c, se


def _data(label: bytes) -> list[Any]:
    return [u(CKA_CLASS, CKO_DATA), b(CKA_TOKEN, True), s(CKA_LABEL, label),
            s(CKA_VALUE, b"v"), b(CKA_COPYABLE, True)]


def _make(path: str, labels: list[bytes]) -> list[int]:
    """C_CreateObject of one token data object per label: the CK_RV of each."""
    c, se = _session(path)
    out = [_rv(c, "C_CreateObject", se, _data(label)) for label in labels]
    c.close()
    return out


def _heavy(path: str, n: int) -> list[int]:
    """Certificates of six 64 KiB attributes each (~400 KiB an object)."""
    c, se = _session(path)
    big = b"\x30" * (64 * 1024)
    out = []
    for i in range(n):
        tpl = [u(CKA_CLASS, CKO_CERTIFICATE), b(CKA_TOKEN, True),
               s(CKA_LABEL, b"%d" % i + big[:-8]), s(CKA_SUBJECT, big), s(CKA_ID, big),
               s(CKA_ISSUER, big), s(CKA_SERIAL_NUMBER, big), s(CKA_VALUE, big)]
        out.append(_rv(c, "C_CreateObject", se, tpl))
        if out[-1] != ckr.OK:
            break
    c.close()
    return out


def _rename_destroy_make(path: str) -> dict[str, int]:
    """At the quota: rename one object, destroy it under its new label, make one."""
    c, se = _session(path)
    (h, *_) = find(c, se, [s(CKA_LABEL, b"same")])
    out = {"rename": _rv(c, "C_SetAttributeValue", se, h, [s(CKA_LABEL, b"renamed")]),
           "over": _rv(c, "C_CreateObject", se, _data(b"same"))}
    out["destroy"] = _rv(c, "C_DestroyObject", se, h)
    out["again"] = _rv(c, "C_CreateObject", se, _data(b"same"))
    out["over_again"] = _rv(c, "C_CreateObject", se, _data(b"other"))
    c.close()
    return out


def _relabel_shared(path: str) -> dict[str, Any]:
    """A cow change (a copy in layer 0) of the shared object ``shared``."""
    c, se = _session(path)
    (h,) = find(c, se, [s(CKA_LABEL, b"shared")])
    out: dict[str, Any] = {"set": _rv(c, "C_SetAttributeValue", se, h,
                                      [s(CKA_LABEL, b"my-copy")])}
    (attrs, _rv_in_band) = c.call(ID("C_GetAttributeValue"),
                                  [se, h, [AttrRequest(CKA_LABEL, 64)]])
    out["label"] = attrs[0].value
    c.close()
    return out


def test_a_repeated_object_identity_counts_every_time(env: dict[str, Any]) -> None:
    # the administrator has no layer 0: only the gateway's quota bounds it
    path = env["gw"].path
    assert as_uid(ADMIN, _make, path, [b"shared"]) == [ckr.OK]
    assert as_uid(ADMIN, _make, path, [b"same"] * (QUOTA - 1)) == [ckr.OK] * (QUOTA - 1)
    assert as_uid(ADMIN, _make, path, [b"same", b"other"]) == [ckr.DEVICE_MEMORY] * 2
    # a rename moves the count with the object: destroyed under its new label, it
    # gives its place back (and only one)
    assert as_uid(ADMIN, _rename_destroy_make, path) == {
        "rename": ckr.OK, "over": ckr.DEVICE_MEMORY, "destroy": ckr.OK, "again": ckr.OK,
        "over_again": ckr.DEVICE_MEMORY}
    # another identity (same token, its own layer 0), same labels: its own quota
    assert as_uid(A, _make, path, [b"same"] * 3) == [ckr.OK] * 3


def test_layer_0_is_bounded_across_restarts(env: dict[str, Any]) -> None:
    path = env["gw"].path
    made = as_uid(A, _make, path, [b"a%d" % i for i in range(QUOTA)])
    assert made == [ckr.OK] * (QUOTA - 3) + [ckr.DEVICE_MEMORY] * 3  # 3 made before
    env["gw"].stop()
    env["gw"] = Gateway(env["cfg"])
    path = env["gw"].path
    # the gateway's count starts at 0 again; the file still holds QUOTA objects
    assert as_uid(A, _make, path, [b"after-restart"]) == [ckr.DEVICE_MEMORY]
    # a cow copy is an object in layer 0 too: refused, and no copy left behind
    assert as_uid(A, _relabel_shared, path) == {"set": ckr.DEVICE_MEMORY,
                                                "label": b"shared"}
    # the others are not affected
    assert as_uid(B, _make, path, [b"b0"]) == [ckr.OK]
    assert as_uid(B, _relabel_shared, path) == {"set": ckr.OK, "label": b"my-copy"}


def test_layer_0_bytes_are_bounded(env: dict[str, Any]) -> None:
    path = env["gw"].path
    res = as_uid(C, _heavy, path, QUOTA, timeout=300)
    # 32 MiB holds some 80 such objects: the bytes are reached before the count
    assert res[-1] == ckr.DEVICE_MEMORY and 40 < len(res) < QUOTA, res
    assert set(res[:-1]) == {ckr.OK}
    assert as_uid(B, _make, path, [b"b1"]) == [ckr.OK]
    size = sum(p.stat().st_size for p in (Path(env["cfg"]).parent / "own").glob("*.db*"))
    assert size < 4 * (32 << 20)

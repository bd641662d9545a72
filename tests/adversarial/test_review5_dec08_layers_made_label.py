"""Fifth review (layered soft tokens): a token made by a client, on raw frames of two
uids.

Found: the label of a made token was cut to 32 *characters* after invalid bytes had
become U+FFFD (three bytes each), then to 32 bytes when shown: CK_TOKEN_INFO.label of
a token made with 32 bytes 0xff ended in half a character (not UTF-8, which
CK_UTF8CHAR promises). Now it is cut to 32 bytes between characters.

Checked as sound alongside: another uid neither lists nor reaches the made token (every
slot call gives CKR_SLOT_ID_INVALID, its C_InitToken too), and the maker cannot wipe it
(C_InitToken on it is refused; its objects stay).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import ID, b, s, u
from tests.gateway_proc import Gateway
from tests.policy.tenants import as_uid, find, raw, remove, shared_socket_dir, slot_of

from p11gate.codec import ReplyError, ckr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be other uids)")

A, B = 1081, 1082
CKA_CLASS, CKA_TOKEN, CKA_LABEL = 0x0, 0x1, 0x3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("layers-made")
    for name, pin in (("so.pin", "layer-so-pin-6"), ("user.pin", "layer-user-pin-6")):
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

[[backend]]
name = "team"
type = "soft"
init_so_pin_file = "{base / 'so.pin'}"
init_user_pin_file = "{base / 'user.pin'}"
own_layer_dir = "{base / 'own'}"

[[token]]
name = "offer"
backend = "team"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
client_tokens = 2

[[rule]]
name = "members"
uid = [{A}, {B}]
tokens = ["offer"]
""")
    gw = Gateway(cfg)
    try:
        yield {"gw": gw, "base": base}
    finally:
        gw.stop()
        remove(sockdir)


def _rv(c: Any, name: str, *args: Any) -> int:
    try:
        c.call(ID(name), list(args))
    except ReplyError as e:
        return e.rv
    return ckr.OK


def _labels(c: Any) -> dict[int, bytes]:
    (slots,) = c.call(ID("C_GetSlotList"), [1, 64])
    return {int(x): c.call(ID("C_GetTokenInfo"), [x])[0] for x in slots}


def _make(path: str, label: bytes) -> dict[str, Any]:
    c = raw(path)
    before = _labels(c)
    rv = _rv(c, "C_InitToken", slot_of(c, "offer"), b"", label)
    (slot,) = [x for x in _labels(c) if x not in before]
    (se,) = c.call(ID("C_OpenSession"), [slot, 6])
    c.call(ID("C_Login"), [se, 1, None])
    c.call(ID("C_CreateObject"), [se, [u(CKA_CLASS, 0), b(CKA_TOKEN, True),
                                       s(CKA_LABEL, b"kept")]])
    c.call(ID("C_CloseSession"), [se])
    out = {"rv": rv, "slot": slot, "label": _labels(c)[slot],
           "reinit": _rv(c, "C_InitToken", slot, b"", b"wiped")}
    (se,) = c.call(ID("C_OpenSession"), [slot, 6])
    c.call(ID("C_Login"), [se, 1, None])
    out["kept"] = len(find(c, se, [s(CKA_LABEL, b"kept")]))
    c.close()
    return out


def _foreign(path: str, slot: int) -> dict[str, Any]:
    c = raw(path)
    out = {"listed": slot in _labels(c)}
    for name, args in (("C_GetSlotInfo", [slot]), ("C_GetTokenInfo", [slot]),
                       ("C_OpenSession", [slot, 6]), ("C_InitToken", [slot, b"", b"x"]),
                       ("C_GetMechanismList", [slot, 64])):
        out[name] = _rv(c, name, *args)
    c.close()
    return out


def test_a_made_token_label_is_whole_utf8(env: dict[str, Any]) -> None:
    path = env["gw"].path
    res = as_uid(A, _make, path, b"\xff" * 32)
    assert res["rv"] == ckr.OK
    label = res["label"]
    assert len(label) == 32
    assert label.decode("utf-8").rstrip(" ") == "\ufffd" * 10  # 30 bytes, then spaces
    # the maker cannot wipe it, and its object stays
    assert res["reinit"] != ckr.OK and res["kept"] == 1
    # the index the gateway keeps holds the label as shown
    (index,) = (env["base"] / "own" / "made").glob("*.json")
    assert [len(m["label"].encode()) for m in json.loads(index.read_text())] == [30]
    # another uid: not listed, not reachable, not wipeable
    assert as_uid(B, _foreign, path, res["slot"]) == {
        "listed": False, "C_GetSlotInfo": ckr.SLOT_ID_INVALID,
        "C_GetTokenInfo": ckr.SLOT_ID_INVALID, "C_OpenSession": ckr.SLOT_ID_INVALID,
        "C_InitToken": ckr.SLOT_ID_INVALID, "C_GetMechanismList": ckr.SLOT_ID_INVALID}
    # a label of whole characters is kept as given
    res = as_uid(A, _make, path, "é".encode() * 16)
    assert res["label"].decode("utf-8") == "é" * 16

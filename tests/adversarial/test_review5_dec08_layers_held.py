"""Fifth review (layered soft tokens): operation data is bounded per identity across
all its tokens, on raw frames of two uids.

Found: every identity's view of a layered token, and every token an identity made
with C_InitToken, is a soft token of its own, each allowed to hold 256 MiB of
operation data (multi-part input, GCM ciphertext until the tag). One uid with
``client_tokens = 64`` could so put some 16 GiB into the gateway's memory, for
everybody. Now one identity's tokens of a layered back end hold 64 MiB together, all
identities' 256 MiB (as one soft token): past that, CKR_DEVICE_MEMORY for that call.
Another identity still gets its share while the first holds all of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import ID, b, s, u
from tests.gateway_proc import Gateway, RawClient
from tests.policy.tenants import as_uid, remove, shared_socket_dir

from p11gate.backends.token_backend import MAX_HELD
from p11gate.codec import Mechanism, ReplyError, ckr
from p11gate.codec.tables import V026
from p11gate.codec.values import GcmParams

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be other uids)")

A, B = 1091, 1092
CHUNK = 1000 * 1024  # one Update per session, inside the 1 MiB frame
CKA_CLASS, CKA_TOKEN, CKA_VALUE, CKA_KEY_TYPE = 0x0, 0x1, 0x11, 0x100
CKA_ENCRYPT, CKA_DECRYPT = 0x104, 0x105
#: one identity's share of a layered back end (layered_backend.IDENTITY_HELD)
IDENTITY_HELD = MAX_HELD // 4
GCM = Mechanism(0x1087, GcmParams(b"\1" * 12, 96, b"", 128))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("layers-held")
    for name, pin in (("so.pin", "layer-so-pin-7"), ("user.pin", "layer-user-pin-7")):
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
name = "team"
backend = "team"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
own_layer = ["members"]

[[token]]
name = "offer"
backend = "team"
pin_mode = "none"
backend_pin_file = "{base / 'user.pin'}"
client_tokens = 2

[[rule]]
name = "members"
uid = [{A}, {B}]
tokens = ["team", "offer"]
""")
    gw = Gateway(cfg)
    try:
        yield {"gw": gw}
    finally:
        gw.stop()
        remove(sockdir)


def _client(path: str) -> RawClient:
    c = RawClient(path, version=2, dialect=V026, timeout=30)
    c.initialize()
    return c


def _slots(c: RawClient) -> dict[bytes, int]:
    (slots,) = c.call(ID("C_GetSlotList"), [1, 64])
    return {c.call(ID("C_GetTokenInfo"), [x])[0].rstrip(b" "): int(x) for x in slots}


def _rv(c: RawClient, name: str, *args: Any) -> int:
    try:
        c.call(ID(name), list(args))
    except ReplyError as e:
        return e.rv
    return ckr.OK


class Holder:
    """Sessions of one token, each holding CHUNK bytes in a GCM decryption."""

    def __init__(self, c: RawClient, slot: int) -> None:
        self.c, self.slot = c, slot
        (self.sess,) = c.call(ID("C_OpenSession"), [slot, 6])
        c.call(ID("C_Login"), [self.sess, 1, None])
        (self.key,) = c.call(ID("C_CreateObject"), [self.sess, [
            u(CKA_CLASS, 4), u(CKA_KEY_TYPE, 0x1F), b(CKA_TOKEN, False),
            s(CKA_VALUE, b"k" * 16), b(CKA_ENCRYPT, True), b(CKA_DECRYPT, True)]])
        self.data = os.urandom(CHUNK)

    def hold(self) -> int:
        (h,) = self.c.call(ID("C_OpenSession"), [self.slot, 6])
        self.c.call(ID("C_DecryptInit"), [h, GCM, self.key])
        return _rv(self.c, "C_DecryptUpdate", h, self.data, 0xFFFF)

    def fill(self, most: int) -> int:
        """Chunks held until the token refuses (CKR_DEVICE_MEMORY) or ``most``."""
        for n in range(most):
            code = self.hold()
            if code != ckr.OK:
                assert code == ckr.DEVICE_MEMORY, code
                return n
        return most


def _hold_everything(path: str, ready: Any, go: Any) -> dict[str, int]:
    c = _client(path)
    out = {"made": _rv(c, "C_InitToken", _slots(c)[b"offer"], b"", b"a-made")}
    own = Holder(c, _slots(c)[b"team"])
    made = Holder(c, _slots(c)[b"a-made"])
    # well past one identity's share, and past the whole back end's 256 MiB when
    # each token counted alone
    out["own"] = own.fill(IDENTITY_HELD // CHUNK + 8)
    out["made_after"] = made.fill(4 * IDENTITY_HELD // CHUNK + 8)
    ready.set()
    go.wait(120)
    c.close()
    return out


def _hold_one(path: str) -> int:
    c = _client(path)
    code = Holder(c, _slots(c)[b"team"]).hold()
    c.close()
    return code


def test_one_identity_holds_a_bounded_share_across_its_tokens(env: dict[str, Any]) -> None:
    path = env["gw"].path
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    done: list[Any] = []
    th = threading.Thread(target=lambda: done.append(
        as_uid(A, _hold_everything, path, ready, go, timeout=300)))
    th.start()
    try:
        assert ready.wait(300)
        # while A holds all it may: B still gets its share
        assert as_uid(B, _hold_one, path) == ckr.OK
    finally:
        go.set()
        th.join(300)
    (res,) = done
    assert res["made"] == ckr.OK
    share = IDENTITY_HELD // CHUNK
    assert share - 2 <= res["own"] <= share
    # A's token it made draws on the same share: nothing left for it
    assert res["made_after"] == 0
    assert env["gw"].alive()

"""Review 2026-12-07: a CKA_LABEL longer than 1024 bytes was read as no label.

The gateway reads an object's identity (CKA_CLASS, CKA_ID, CKA_LABEL) with 1024-byte
buffers; a longer label came back unavailable and was taken for an empty one. A tenant
of an ``owned`` namespace that made a token key with the CKA_ID of an object nobody owns
(the officer's key without a label) and a 1500-byte label passed every check (the
planned identity, with its long label, was free; the identity read back, "no label",
was held by one object: taken for the new one itself) and was recorded as the owner of
(class, CKA_ID, no label): the officer's key then showed in its finds, usable and
destroyable. The identity a handle keeps to be found again after a backend restart was
read with 256-byte buffers the same way: a tenant's handle to its own key with a
300-byte label kept (class, CKA_ID) only, and once that key was destroyed, the old
handle came back after a restart bound to the officer's key with that CKA_ID. Now a
value longer than the first buffer is read whole, in both places.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.adversarial.hostile import (
    CKA_ID,
    CKA_LABEL,
    CKF_RW,
    CKF_SERIAL,
    CKM_AES_KEY_GEN,
    CKU_USER,
    aes_template,
    call,
    rv,
    s,
    stop_gateway,
)
from tests.gateway_proc import Gateway, RawClient, wait_for, worker_pids
from tests.policy.tenants import as_uid, raw, remove, shared_socket_dir, slot_of
from tests.softhsm import make_token

from p11gate.codec import AttrRequest, Mechanism, ckr

TENANT = 1001
VICTIM_ID = b"\x42\x42"
LONG = "L" * 1500


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("longid")
    tok = make_token(base / "softhsm", label="shared", keys=False)
    sockdir = shared_socket_dir()
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"

[[backend]]
name = "softhsm"
module = "{tok['module']}"
env = {{ SOFTHSM2_CONF = "{tok['conf']}" }}

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "shared" }}

[[rule]]
name = "team-a"
uid = [{TENANT}]
tokens = ["shared"]
namespace = {{ owned = true }}

[[rule]]
name = "admins"
uid = [0]
tokens = ["*"]
role = "officer"
""")
    g = Gateway(cfg)
    yield g
    stop_gateway(g, lambda: remove(sockdir))


def _user(path: str) -> tuple[RawClient, int]:
    c = raw(path)
    (h,) = call(c, "C_OpenSession", slot_of(c, "shared"), CKF_SERIAL | CKF_RW)
    call(c, "C_Login", h, CKU_USER, b"1234")
    return c, int(h)


def _label_lengths(c: RawClient, h: int, found: list[int]) -> list[int]:
    out = []
    for o in found:
        (attrs, _rv) = c.call(24, [h, o, [AttrRequest(CKA_LABEL, 4096)]])
        out.append(len(attrs[0].value or b""))
    return sorted(out)


def _tenant(path: str) -> dict[str, Any]:
    c, h = _user(path)
    before = c.find(h, [s(CKA_ID, VICTIM_ID)])
    made = rv(c, "C_GenerateKey", h, Mechanism(CKM_AES_KEY_GEN, None),
              aes_template(LONG, VICTIM_ID))
    after = c.find(h, [s(CKA_ID, VICTIM_ID)])
    out = {"before": before, "made": made, "labels": _label_lengths(c, h, after)}
    c.close()
    return out


def test_a_long_label_does_not_take_over_an_unlabelled_object(gw: Gateway) -> None:
    c, h = _user(gw.path)
    # the officer's key: a CKA_ID, no label, owned by nobody
    call(c, "C_GenerateKey", h, Mechanism(CKM_AES_KEY_GEN, None), aes_template(None, VICTIM_ID))
    res = as_uid(TENANT, _tenant, gw.path)
    assert res["before"] == []
    assert res["made"] == ckr.OK  # its own key, with its own (long) label
    # it sees that key only: never the officer's
    assert res["labels"] == [len(LONG)]
    # both keys are there
    assert _label_lengths(c, h, c.find(h, [s(CKA_ID, VICTIM_ID)])) == [0, len(LONG)]
    c.close()


REVIVE_ID = b"\x77"


def _tenant_across_restart(path: str, ready: Any, go: Any) -> dict[str, Any]:
    c, h = _user(path)
    (mine,) = call(c, "C_GenerateKey", h, Mechanism(CKM_AES_KEY_GEN, None),
                   aes_template("A" * 300, REVIVE_ID))
    time.sleep(0.5)  # the gateway reads the key's identity in the background
    ready.set()
    assert go.wait(60)
    (h2,) = call(c, "C_OpenSession", slot_of(c, "shared"), CKF_SERIAL | CKF_RW)
    # its own key, found again under another handle, is destroyed
    others = [o for o in c.find(h2, [s(CKA_ID, REVIVE_ID)]) if o != mine]
    destroyed = [rv(c, "C_DestroyObject", h2, o) for o in others]
    try:
        (attrs, _rv) = c.call(24, [h2, mine, [AttrRequest(CKA_LABEL, 4096)]])
        out: dict[str, Any] = {"rv": ckr.OK, "label": attrs[0].value}
    except Exception as e:  # ReplyError
        out = {"rv": getattr(e, "rv", None), "label": None}
    out["destroyed"] = destroyed
    c.close()
    return out


def test_a_handle_is_not_found_again_as_another_object_after_a_restart(
    gw: Gateway,
) -> None:
    c, h = _user(gw.path)
    call(c, "C_GenerateKey", h, Mechanism(CKM_AES_KEY_GEN, None),
         aes_template("officer-key", REVIVE_ID))
    c.close()
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    result: dict[str, Any] = {}

    def restart() -> None:
        assert ready.wait(60)
        (pid,) = worker_pids(gw)
        up = len([r for r in gw.records() if r.get("msg") == "backend up"])
        os.kill(pid, signal.SIGKILL)  # a worker crash
        assert wait_for(lambda: len([r for r in gw.records()
                                     if r.get("msg") == "backend up"]) > up, 30)
        go.set()

    th = threading.Thread(target=restart)
    th.start()
    try:
        result = as_uid(TENANT, _tenant_across_restart, gw.path, ready, go)
    finally:
        go.set()
        th.join(60)
    assert result["destroyed"] == [ckr.OK]
    # the old handle named the tenant's key, which is gone: never the officer's
    assert result["rv"] == ckr.OBJECT_HANDLE_INVALID, result

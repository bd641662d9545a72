"""Fifth review (layered soft tokens): one process serves a layered token.

Found: with ``[server] processes = 2`` every gateway process kept the layers in its
own memory and never read another's changes. Through raw frames of an administrator
uid on two connections (one per process): an object published through one was not
there through the other, and an AES key destroyed through one (a revoked key) still
encrypted through the other, for every member served there, until a restart. The
per-identity bounds (objects in layer 0, tokens made, held data) were per process too.
Now the configuration is refused: a layered soft back end needs ``processes = 1``.

Checked as sound alongside, in one process: a shared key the administrator destroys is
gone at once for a member's connections, a handle it had included.
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

from p11gate.codec import Mechanism, ReplyError, ckr
from p11gate.config import ConfigError, load_config

ADMIN, A = 1101, 1102
CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_VALUE, CKA_KEY_TYPE = 0x0, 0x1, 0x3, 0x11, 0x100
CKA_ENCRYPT = 0x104
CKM_AES_ECB = 0x1081


def _config(base: Path, sockdir: Path, processes: object) -> Path:
    for name, pin in (("so.pin", "layer-so-pin-8"), ("user.pin", "layer-user-pin-8")):
        (base / name).write_text(pin + "\n")
        (base / name).chmod(0o600)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={sockdir / 'gw.sock'}"
state_dir = "{base / 'state'}"
socket_mode = 0o666
log_format = "json"
processes = {processes}

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
    {{ rule = "members", access = "ro" }} ] }}]

[[rule]]
name = "admin"
uid = [{ADMIN}]
tokens = ["team"]

[[rule]]
name = "members"
uid = [{A}]
tokens = ["team"]
""")
    return cfg


@pytest.mark.parametrize("processes", ["2", '"auto"'])
def test_several_processes_are_refused_for_a_layered_token(tmp_path: Path,
                                                           processes: str) -> None:
    cfg = _config(tmp_path, tmp_path, processes)
    if processes == '"auto"' and (os.cpu_count() or 1) == 1:
        load_config(cfg)  # one core: one process
        return
    with pytest.raises(ConfigError, match=r"processes = 1"):
        load_config(cfg)
    load_config(_config(tmp_path, tmp_path, 1))


# ---------------------------------------------------------------- one process: sound


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (to be other uids)")
    base = tmp_path_factory.mktemp("layers-processes")
    sockdir = shared_socket_dir()
    gw = Gateway(_config(base, sockdir, 1))
    try:
        yield {"gw": gw}
    finally:
        gw.stop()
        remove(sockdir)


def _session(path: str) -> tuple[Any, int]:
    c = raw(path)
    (se,) = c.call(ID("C_OpenSession"), [slot_of(c, "team"), 6])
    c.call(ID("C_Login"), [se, 1, None])
    return c, se


def _rv(c: Any, name: str, *args: Any) -> int:
    try:
        c.call(ID(name), list(args))
    except ReplyError as e:
        return e.rv
    return ckr.OK


def _publish(path: str) -> int:
    c, se = _session(path)
    return _rv(c, "C_CreateObject", se, [
        u(CKA_CLASS, 4), u(CKA_KEY_TYPE, 0x1F), b(CKA_TOKEN, True), s(CKA_LABEL, b"shared"),
        s(CKA_VALUE, b"k" * 16), b(CKA_ENCRYPT, True)])


def _revoke(path: str) -> int:
    c, se = _session(path)
    (h,) = find(c, se, [s(CKA_LABEL, b"shared")])
    return _rv(c, "C_DestroyObject", se, h)


def _use_on_two_connections(path: str, ready: Any, go: Any) -> dict[str, Any]:
    conns = [_session(path) for _ in range(2)]
    keys = [find(c, se, [s(CKA_LABEL, b"shared")]) for c, se in conns]
    out: dict[str, Any] = {"before": [len(k) for k in keys]}
    ready.set()
    go.wait(60)
    out["after"] = [len(find(c, se, [s(CKA_LABEL, b"shared")])) for c, se in conns]
    out["use"] = [_rv(c, "C_EncryptInit", se, Mechanism(CKM_AES_ECB, None), k[0])
                  for (c, se), k in zip(conns, keys, strict=True)]
    return out


def test_a_revoked_shared_key_is_gone_for_every_connection(env: dict[str, Any]) -> None:
    import multiprocessing
    import threading

    path = env["gw"].path
    assert as_uid(ADMIN, _publish, path) == ckr.OK
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    done: list[Any] = []
    th = threading.Thread(target=lambda: done.append(
        as_uid(A, _use_on_two_connections, path, ready, go)))
    th.start()
    try:
        assert ready.wait(60)
        assert as_uid(ADMIN, _revoke, path) == ckr.OK
    finally:
        go.set()
        th.join(90)
    assert done == [{"before": [1, 1], "after": [0, 0],
                     "use": [ckr.KEY_HANDLE_INVALID] * 2}]

"""Shared set-up of the mechanism-parameter tests: a gateway over SoftHSM whose socket a
second uid (role "readonly") reaches, and the raw calls that uid makes."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.gateway_proc import Gateway, RawClient, rv_of
from tests.policy.tenants import CKF_SERIAL, C_OpenSession, remove, shared_socket_dir, slot_of
from tests.softhsm import make_token

from p11gate.codec import Attribute, Mechanism, ReplyError, dialect_for_version

RO = 1003  # the hostile tenant: role "readonly", never logs in
LISTED_VENDOR = 0x80000101  # on the backend's raw_parameter_mechanisms
UNLISTED_VENDOR = 0x80000202
C_EncryptInit, C_SignInit, C_GenerateKey, C_DeriveKey = 29, 42, 58, 62
C_GenerateRandom, C_CloseSession = 64, 13
CKM_AES_KEY_GEN, CKM_AES_ECB_ENCRYPT_DATA = 0x1080, 0x1104
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_KEY_TYPE = 0, 1, 2, 0x100
CKA_ENCRYPT, CKA_SIGN, CKA_DERIVE, CKA_VALUE_LEN = 0x104, 0x108, 0x10C, 0x161
CKO_SECRET_KEY, CKK_AES = 4, 0x1F

#: CK_KEY_DERIVATION_STRING_DATA {pData = 0x4141414141414141, ulLen = 16}: the attack
HOSTILE_STRING_DATA = struct.pack("=QQ", 0x4141414141414141, 16)

SESSION_AES = [
    Attribute(CKA_CLASS, CKO_SECRET_KEY, 8), Attribute(CKA_KEY_TYPE, CKK_AES, 8),
    Attribute(CKA_VALUE_LEN, 16, 8), Attribute(CKA_TOKEN, 0, 1),
    Attribute(CKA_PRIVATE, 0, 1), Attribute(CKA_ENCRYPT, 1, 1), Attribute(CKA_SIGN, 1, 1),
    Attribute(CKA_DERIVE, 1, 1),
]
DERIVED = [Attribute(CKA_CLASS, CKO_SECRET_KEY, 8), Attribute(CKA_KEY_TYPE, CKK_AES, 8),
           Attribute(CKA_VALUE_LEN, 16, 8), Attribute(CKA_TOKEN, 0, 1),
           Attribute(CKA_PRIVATE, 0, 1)]


@contextmanager
def gateway(base: Path, isolation: str) -> Iterator[Gateway]:
    """A gateway with one SoftHSM token "shared": uid RO may use it (readonly), root is
    officer. The backend lists LISTED_VENDOR in raw_parameter_mechanisms."""
    hsm = make_token(base / "softhsm", label="shared")
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
module = "{hsm['module']}"
isolation = "{isolation}"
call_timeout = 10.0
env = {{ SOFTHSM2_CONF = "{hsm['conf']}" }}
raw_parameter_mechanisms = [{LISTED_VENDOR:#x}]

[[token]]
name = "shared"
backend = "softhsm"
select = {{ label = "shared" }}

[[rule]]
name = "auditors"
uid = [{RO}]
tokens = ["shared"]
role = "readonly"

[[rule]]
name = "admins"
uid = [0]
tokens = ["*"]
role = "officer"
""")
    gw = Gateway(cfg)
    try:
        yield gw
    finally:
        gw.stop()
        remove(sockdir)


def connect(path: str, version: int) -> RawClient:
    c = RawClient(path, version=version, dialect=dialect_for_version(version))
    c.initialize()
    return c


def ro_session_with_key(c: RawClient) -> tuple[int, int]:
    """A read-only public session and a session AES key made in it."""
    (s,) = c.call(C_OpenSession, [slot_of(c, "shared"), CKF_SERIAL])
    (key,) = c.call(C_GenerateKey, [s, Mechanism(CKM_AES_KEY_GEN, None), SESSION_AES])
    return int(s), int(key)


def raw_call_rv(c: RawClient, call_id: int, s: int, key: int, mtype: int,
                param: bytes | None) -> int:
    """The CK_RV of one key call with a raw parameter (``param`` bytes as the client
    sends them: the codec encodes them as a byte array)."""
    m = Mechanism(mtype, param)
    if call_id in (C_EncryptInit, C_SignInit):
        return rv_of(c, call_id, [s, m, key])
    if call_id == C_DeriveKey:
        return rv_of(c, call_id, [s, m, key, DERIVED])
    if call_id == C_GenerateKey:
        return rv_of(c, call_id, [s, m, SESSION_AES])
    raise AssertionError(call_id)


def random_ok(c: RawClient, s: int) -> bool:
    try:
        (data,) = c.call(C_GenerateRandom, [s, 16])
    except ReplyError:
        return False
    return isinstance(data, bytes) and len(data) == 16

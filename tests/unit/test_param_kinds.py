"""Issue 9.1: every mechanism type is serialized, parameterless, flat or refused.

Walks every CKM_ of the PKCS#11 3.1 headers (tests/vectors, no network) and every
mechanism type the codec knows (all dialects' serializers and parameterless lists), with
raw-bytes parameters of several shapes, through the actual checks of the frontend
(ClientConnection._mechanism) and of the native layer (NativeModule._mechanism); and
checks the flat/pointer table itself against the struct declarations of the 3.1 header.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from tests.softhsm import MODULE, requires_softhsm

from p11gate.backends.native import NativeModule
from p11gate.backends.native.cdef import ULONG_SIZE, ffi
from p11gate.backends.pool.config import MemberConfig, PoolConfig
from p11gate.backends.pool.pool import PoolBackend
from p11gate.codec import CALLS, V0241, V025, V026, Mechanism, ckr
from p11gate.codec import param_kinds as pk
from p11gate.codec.param_kinds_data import MECHANISM_PARAMETERS
from p11gate.config import BackendConfig
from p11gate.errors import Pkcs11Error
from p11gate.frontend.connection import ClientConnection
from p11gate.registry import Registry

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
VENDOR_LISTED = 0x80000101
SHAPES = [b"", b"\x41", b"\x41" * 4, b"\x41" * 8, b"\x41" * 16, b"\x41" * 24, b"\x41" * 40,
          b"\x41" * 4096]
#: codec serializers whose struct holds pointers or handles: raw bytes never pass for them
POINTER_SERIALIZERS = {"rsa_pkcs_oaep_mechanism", "ecdh1_derive_mechanism", "aes_gcm_mechanism",
                       "ibm_btc_derive_mechanism", "ibm_kyber_mechanism",
                       "ibm_attrbound_wrap_mechanism"}
#: the others, with the size of the C struct the module reads
FLAT_SERIALIZERS = {"rsa_pkcs_pss_mechanism": ffi.sizeof("CK_RSA_PKCS_PSS_PARAMS"),
                    "aes_iv_mechanism": 16, "des_iv_mechanism": 8,
                    "aes_ctr_mechanism": ffi.sizeof("CK_AES_CTR_PARAMS"),
                    "mac_general_mechanism": ULONG_SIZE, "dh_pkcs_derive_mechanism": None}


def mechanisms_31() -> dict[str, int]:
    out = {}
    for line in (VECTORS / "pkcs11-3.1-mechanisms.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name] = int(value, 16)
    return out


def codec_known() -> set[int]:
    known: set[int] = set()
    for d in (V0241, V025, V026):
        known |= set(d.serializers) | set(d.noparam)
    return known


# ---------------------------------------------------------------- the two checks


class _Backend:
    raw_parameter_mechanisms = frozenset({VENDOR_LISTED})


_TOKEN = cast(Any, SimpleNamespace(backend=_Backend()))


def frontend_passes(mtype: int, param: bytes) -> bool:
    try:
        ClientConnection._mechanism(cast(Any, None), Mechanism(mtype, param), _TOKEN)
    except Pkcs11Error as e:
        assert e.rv == ckr.MECHANISM_PARAM_INVALID, (hex(mtype), e)
        return False
    return True


@pytest.fixture(scope="module")
def native() -> NativeModule:
    return NativeModule(MODULE, raw_parameter_mechanisms=[VENDOR_LISTED])


def native_passes(mod: NativeModule, mtype: int, param: bytes) -> bool:
    keep: list[Any] = []
    try:
        mech = mod._mechanism(Mechanism(mtype, param), keep, None)
    except Pkcs11Error as e:
        assert e.rv == ckr.MECHANISM_PARAM_INVALID, (hex(mtype), e)
        return False
    if param:
        assert mech.ulParameterLen == len(param)
    else:
        assert mech.pParameter == ffi.NULL and mech.ulParameterLen == 0
    return True


# ---------------------------------------------------------------- the walk


def test_every_31_mechanism_is_classified() -> None:
    ms = mechanisms_31()
    assert len(ms) == 443 and len(set(ms.values())) == 427  # 3.1: aliases share values
    for name, value in ms.items():
        assert value in pk.KINDS, name
    table = {f"CKM_{n}": v for v, n, _ in MECHANISM_PARAMETERS}
    assert table == ms  # the table has exactly the headers' rows


@requires_softhsm
def test_walk_every_mechanism_through_both_checks(native: NativeModule) -> None:
    rng = random.Random(0x9_1)
    types = set(mechanisms_31().values()) | codec_known() | {VENDOR_LISTED}
    types |= {rng.randrange(0, 0x80000000) for _ in range(300)}
    types |= {rng.randrange(0x80000000, 0xFFFFFFFF) for _ in range(300)}
    counts = {"serialized": 0, "parameterless": 0, "flat": 0, "refused": 0, "vendor": 0}
    for mtype in sorted(types):
        k = pk.kind_of(mtype)
        passed = []
        for shape in SHAPES:
            front = frontend_passes(mtype, shape)
            if mtype in pk.HANDLE_IN_RAW_PARAM:  # the frontend refuses even an empty one
                assert not front and native_passes(native, mtype, shape) == (not shape)
                continue
            assert native_passes(native, mtype, shape) == front, (hex(mtype), len(shape))
            if not shape:
                assert front, f"{pk.name_of(mtype)}: an empty parameter must pass"
            elif front:
                passed.append(len(shape))
                # raw bytes passed: only a flat parameter of a fitting size, or listed
                assert (k.kind == pk.FLAT and (k.sizes is None or len(shape) in k.sizes)) \
                    or mtype == VENDOR_LISTED, (pk.name_of(mtype), k, len(shape))
        ser = V026.serializers.get(mtype)
        if ser in POINTER_SERIALIZERS:
            assert passed == [], pk.name_of(mtype)
        elif ser is not None and mtype >= pk.CKM_VENDOR_DEFINED:
            assert passed == [], pk.name_of(mtype)  # a vendor's, not listed
        elif ser is not None:
            size = FLAT_SERIALIZERS[ser]
            assert frontend_passes(mtype, b"\0" * (size or 33)), pk.name_of(mtype)
        if ser is not None:
            counts["serialized"] += 1
        elif k.kind == pk.NONE:
            assert passed == []
            counts["parameterless"] += 1
        elif passed:
            counts["vendor" if mtype >= pk.CKM_VENDOR_DEFINED else "flat"] += 1
        else:
            counts["refused"] += 1
    assert counts["serialized"] == len(V026.serializers)
    assert min(counts.values()) > 0, counts


def test_the_issue_examples() -> None:
    hostile = (0x4141414141414141).to_bytes(8, "little") + (16).to_bytes(8, "little")
    assert not frontend_passes(0x1104, hostile)  # CKM_AES_ECB_ENCRYPT_DATA
    assert not frontend_passes(0x360, b"\1" * ULONG_SIZE)  # CONCATENATE_BASE_AND_KEY: handle
    assert not frontend_passes(0x1087, b"\0" * 40)  # AES_GCM: CK_GCM_PARAMS has pointers
    assert frontend_passes(0x1086, b"\0" * 24) and not frontend_passes(0x1086, b"\0" * 16)
    assert frontend_passes(0x102, b"\0" * 16)  # CK_RC2_CBC_PARAMS
    assert frontend_passes(0x252, b"\0" * ULONG_SIZE)  # CK_MAC_GENERAL_PARAMS
    assert frontend_passes(0x21, b"\5" * 300)  # DH_PKCS_DERIVE: a public value, any length
    assert frontend_passes(0x2109, b"\0" * 8) and not frontend_passes(0x2109, b"\0" * 16)
    assert frontend_passes(VENDOR_LISTED, hostile)
    assert not frontend_passes(VENDOR_LISTED + 1, hostile)


# ---------------------------------------------------------------- table vs 3.1 header

_BASE = {"CK_BYTE": (1, 1), "CK_CHAR": (1, 1), "CK_UTF8CHAR": (1, 1), "CK_BBOOL": (1, 1),
         "CK_ULONG": (ULONG_SIZE, ULONG_SIZE), "CK_LONG": (ULONG_SIZE, ULONG_SIZE)}
_PTR = ffi.sizeof("void *")


def header_decls() -> tuple[dict[str, list[str]], dict[str, str]]:
    structs: dict[str, list[str]] = {}
    typedefs: dict[str, str] = {}
    for line in (VECTORS / "pkcs11-3.1-structs.txt").read_text().splitlines():
        if line.startswith("struct "):
            name, _, fields = line[7:].partition(": ")
            structs[name] = fields.split("; ")
        elif line.startswith("typedef "):
            name, _, target = line[8:].partition(": ")
            typedefs[name] = target
    return structs, typedefs


def _resolve(t: str, typedefs: dict[str, str]) -> str:
    while t in typedefs:
        t = typedefs[t]
    return t


def _is_pointer(t: str, typedefs: dict[str, str]) -> bool:
    t = _resolve(t, typedefs)
    return t.endswith("CK_PTR") or t.endswith("*") or t in ("CK_VOID_PTR",) \
        or t.endswith("_PTR")


def _layout(name: str, structs: dict[str, list[str]],
            typedefs: dict[str, str]) -> tuple[int, int, bool]:
    """(size, alignment, holds a pointer or an object handle) of a 3.1 type."""
    if name.endswith("_PTR") and name not in structs:
        return _PTR, _PTR, True
    handle = name == "CK_OBJECT_HANDLE"
    t = _resolve(name, typedefs)
    if _is_pointer(name, typedefs):
        return _PTR, _PTR, True
    if t in _BASE:
        return (*_BASE[t], handle)
    fields = structs[t]
    size, align, unsafe = 0, 1, False
    for f in fields:
        ftype, fname = f.rsplit(" ", 1)
        m = re.search(r"\[(\d+)\]$", fname)
        count = int(m.group(1)) if m else 1
        fs, fa, fu = _layout(ftype, structs, typedefs)
        size = (size + fa - 1) // fa * fa + fs * count
        align, unsafe = max(align, fa), unsafe or fu
    return (size + align - 1) // align * align, align, unsafe


def test_flat_and_pointer_rows_match_the_31_header() -> None:
    structs, typedefs = header_decls()
    checked = 0
    for _value, name, spec in MECHANISM_PARAMETERS:
        kind, _, rest = spec.partition(":")
        if kind == "struct":
            sname = rest.split("=")[0]
            size, _, unsafe = _layout(sname, structs, typedefs)
            assert not unsafe, f"CKM_{name}: {sname} holds a pointer or handle"
            assert pk.kind_of(_value).sizes == {size}, (name, sname, size)
            checked += 1
        elif kind == "ptr" and rest in structs:
            assert _layout(rest, structs, typedefs)[2], f"CKM_{name}: {rest} is flat"
            checked += 1
        elif kind == "ulong":
            assert pk.kind_of(_value).sizes == {ULONG_SIZE}
    assert checked > 100


def test_cffi_agrees_on_the_structs_it_declares() -> None:
    structs, typedefs = header_decls()
    for sname in ("CK_RSA_PKCS_PSS_PARAMS", "CK_AES_CTR_PARAMS", "CK_GCM_PARAMS",
                  "CK_ECDH1_DERIVE_PARAMS", "CK_RSA_PKCS_OAEP_PARAMS"):
        assert _layout(sname, structs, typedefs)[0] == ffi.sizeof(sname), sname


# ---------------------------------------------------------------- configuration


def test_config_takes_only_vendor_values() -> None:
    base = {"name": "b", "module": sys.executable}
    assert BackendConfig(**base, raw_parameter_mechanisms=[0x80000002, 0x80000001]) \
        .raw_parameter_mechanisms == [0x80000001, 0x80000002]
    for bad in (0x1104, 0x7FFFFFFF, 0xFFFFFFFF, -1):
        with pytest.raises(ValueError, match="not a vendor mechanism"):
            BackendConfig(**base, raw_parameter_mechanisms=[bad])


def test_worker_cli_refuses_a_standard_mechanism() -> None:
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "worker", MODULE,
                        "--raw-parameter-mechanism", "0x1104"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "not a vendor mechanism" in r.stderr, r.stderr


def test_message_parameters_are_never_raw() -> None:
    names = {CALLS[c].name for c in pk.MESSAGE_PARAMETER_CALLS}
    assert names == {f"C_{op}Message{part}" for op in ("Encrypt", "Decrypt", "Sign", "Verify")
                     for part in ("", "Begin", "Next")}
    assert pk.message_parameter_refusal(b"\x41" * 16)
    assert pk.message_parameter_refusal(b"") is None and pk.message_parameter_refusal(None) is None


class _Member:
    def __init__(self, raw: set[int]) -> None:
        self.raw_parameter_mechanisms = frozenset(raw)
        self.name, self.up, self.generation = "m", True, 0


def test_a_pool_allows_what_every_member_allows(tmp_path: Path) -> None:
    cfg = PoolConfig(name="ha", members=[MemberConfig(backend="a"), MemberConfig(backend="b")])
    members = {"a": _Member({0x80000001, 0x80000002}), "b": _Member({0x80000002})}
    pool = PoolBackend(cfg, cast(Any, members), Registry(tmp_path))
    assert pool.raw_parameter_mechanisms == {0x80000002}

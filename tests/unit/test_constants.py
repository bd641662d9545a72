"""The PKCS#11 constants module is exactly what scripts/gen_constants.py generates from
the header extracts in tests/vectors, and the extract matches the installed header."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from p11gate.codec import constants

ROOT = Path(__file__).resolve().parents[2]
HEADER = Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_constants",
                                                  ROOT / "scripts" / "gen_constants.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_constants"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_module_equals_generated() -> None:
    gen = _script()
    assert Path(constants.__file__).read_text() == gen.render()


def test_values_are_the_pkcs11_ones() -> None:
    assert (constants.CKA_CLASS, constants.CKA_ID, constants.CKA_VALUE_LEN) == (0, 0x102, 0x161)
    assert constants.CKA_WRAP_TEMPLATE == 0x40000211  # CKF_ARRAY_ATTRIBUTE | 0x211
    assert constants.CKR_UNWRAPPING_KEY_HANDLE_INVALID == 0xF0
    assert constants.CKM_AES_KEY_WRAP_PAD == 0x210A
    assert constants.CKA_UNIQUE_ID == 0x4
    assert constants.CKO_VENDOR_DEFINED == 1 << 31


def test_extract_matches_the_header_it_came_from() -> None:
    gen = _script()
    rows = gen.extract(HEADER.read_text())  # libp11-kit-dev is a build dependency
    stored = [ln.split() for ln in gen.OTHERS.read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert [(n, int(v, 0)) for n, v in stored] == rows
    assert len(rows) > 300

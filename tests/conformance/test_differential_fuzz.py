"""The differential fuzzer (tests/conformance/differential.py): the same seeded sequence
of well-formed calls on two fresh identical SoftHSM tokens, one through the gateway (both
isolations), one on the module itself (a bare `p11gate worker`). Every CK_RV and output
must agree, except the deliberate differences in ``differential.ALLOWED`` (each with the
README / docs/security.md sentence that makes it so) and the open ones in
``differential.OPEN`` (counted, not failed on).

What it found, each now pinned by a scenario of tests/conformance/scenarios.py that
failed before its fix: object handles kept past the last session; an SO login with a
read-only session answered CKR_USER_ANOTHER_ALREADY_LOGGED_IN; key-family refusals that
hid CKR_OPERATION_ACTIVE, said CKR_KEY_TYPE_INCONSISTENT for a key gone with its session
or CKR_KEY_FUNCTION_NOT_PERMITTED where SoftHSM's C_WrapKey/C_UnwrapKey name the type;
a session that could never digest again after a C_DigestKey and a logout; and a crash:
SoftHSM keeps the object of a C_CreateObject it refused as CKR_TEMPLATE_INCOMPLETE, and
an RSA public key without CKA_PUBLIC_EXPONENT kills the worker (in-process: the gateway)
in C_Verify — such templates are now refused before the module
(tests/adversarial/test_diff_dec08_incomplete_key_templates.py).

Open (reproductions, raw frames through the gateway):

* CKR_ARGUMENTS_BAD first: C_GenerateRandom(stale session, 0) and C_FindObjects(no
  search, 0) (a NULL output): SoftHSM checks the pointer before the session or search,
  the gateway answers CKR_SESSION_HANDLE_INVALID / CKR_OPERATION_NOT_INITIALIZED.
* After a C_FindObjectsInit SoftHSM refused with CKR_GENERAL_ERROR (seen with objects
  left by refused creations), SoftHSM keeps a broken search (its C_FindObjects:
  CKR_GENERAL_ERROR, C_FindObjectsFinal: CKR_OK); the gateway answers both
  CKR_OPERATION_NOT_INITIALIZED and never ends it, so the session's next inits get
  CKR_OPERATION_ACTIVE until it is closed.
* C_WrapKey with a wrapping key the module rejects and an unknown key to wrap: the
  gateway answers the unknown key's code (CKR_KEY_HANDLE_INVALID) where SoftHSM names the
  wrapping key (CKR_WRAPPING_KEY_HANDLE_INVALID).

``P11GATE_DIFF_SEEDS`` / ``P11GATE_DIFF_CALLS`` change the seeds and the length.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.gateway_proc import Gateway, write_config
from tests.softhsm import make_token, requires_softhsm

from .differential import Differ, WorkerSide, gateway_side, make_key_material

pytestmark = requires_softhsm

CALLS = int(os.environ.get("P11GATE_DIFF_CALLS", "1500"))
SEEDS = [int(x) for x in os.environ.get("P11GATE_DIFF_SEEDS", "1,2,3").split(",")]
KEYS = make_key_material()


def run_differ(tmp: Path, isolation: str, seed: int, calls: int = CALLS) -> Differ:
    gw_token = make_token(tmp / "gw-hsm", label="difftok", keys=False)
    direct_token = make_token(tmp / "direct-hsm", label="difftok", keys=False)
    (tmp / "gw").mkdir()
    gw = Gateway(write_config(tmp / "gw", gw_token, isolation))
    direct = None
    try:
        direct = WorkerSide(direct_token, tmp / "worker.log")
        gws = gateway_side(gw.path, "difftok")
        d = Differ(gws, direct, seed, KEYS)
        try:
            d.run(calls)
        except (ConnectionError, OSError):
            assert d.direct_dead is not None, "the gateway closed the connection"
        gws.close()
        d.gateway_alive = gw.alive()  # type: ignore[attr-defined]
        return d
    finally:
        if direct is not None:
            direct.close()
        gw.stop()


@pytest.mark.parametrize("isolation", ["process", "none"])
@pytest.mark.parametrize("seed", SEEDS)
def test_gateway_answers_as_the_module(tmp_path: Path, isolation: str, seed: int) -> None:
    d = run_differ(tmp_path, isolation, seed)
    assert d.direct_dead is None, d.direct_dead
    assert d.gateway_alive  # type: ignore[attr-defined]
    # the sequence did reach the module: most calls were well-formed and many succeeded
    assert d.calls >= CALLS and d.ok >= CALLS // 4, (d.calls, d.ok)
    shown = "\n\n".join(str(x) for x in d.divergences[:8])
    assert not d.divergences, f"{len(d.divergences)} unexplained divergences:\n{shown}"

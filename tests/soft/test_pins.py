"""PIN and token functions of the soft token with PKCS#11 2.40 semantics, checked
against SoftHSMv2 itself: one scenario of C_Login/C_Logout/C_InitToken/C_InitPIN/C_SetPIN
(every login-state and PIN error) runs on a SoftHSM token loaded directly and on a soft
token, and gives the same CK_RV at every step and the same token flags at every stage.
Then what SoftHSM cannot show: C_SetPIN re-wraps the token key (new salt, keys kept)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from tests.conformance.ways import DirectWay
from tests.soft.helpers import Driver, cid, soft_config
from tests.soft_token import make_soft_token
from tests.softhsm import make_token, requires_softhsm

from p11gate.backends.soft.store import SO, USER, SoftStore
from p11gate.codec import ckr
from p11gate.codec.values import Mechanism
from p11gate.errors import Pkcs11Error

RO, RW = 4, 6
CKU_SO, CKU_USER = 0, 1
#: token flags the scenario compares
FLAGS = {"LOGIN_REQUIRED": 0x4, "USER_PIN_INITIALIZED": 0x8, "TOKEN_INITIALIZED": 0x400,
         "USER_PIN_TO_BE_CHANGED": 0x80000, "SO_PIN_TO_BE_CHANGED": 0x800000}
LABEL = b"pins".ljust(32)
#: by design (docs/soft-token.md): step → (soft token's CK_RV, SoftHSM's)
DIFFERENCES = {
    # PKCS#11 2.40 C_Logout: CKR_USER_NOT_LOGGED_IN; SoftHSM 2.6 answers CKR_OK
    "logout, nobody logged in": (ckr.USER_NOT_LOGGED_IN, ckr.OK),
}

Call = Callable[..., tuple[int, Any]]


def scenario(call: Call, slot: int) -> list[tuple[str, Any]]:
    """Each step's (name, CK_RV), and ("flags", names) at each stage."""
    out: list[tuple[str, Any]] = []

    def step(what: str, name: str, *args: Any) -> Any:
        rv, result = call(name, *args)
        out.append((what, rv))
        return result

    def flags(stage: str) -> None:
        _, info = call("C_GetTokenInfo", slot)
        out.append((f"flags {stage}", sorted(n for n, f in FLAGS.items() if info[4] & f)))

    flags("initialised")
    (ro,) = step("open RO", "C_OpenSession", slot, RO)
    (rw,) = step("open RW", "C_OpenSession", slot, RW)
    step("logout, nobody logged in", "C_Logout", rw)
    step("login, wrong user PIN", "C_Login", rw, CKU_USER, b"0000")
    step("SO login with an RO session", "C_Login", rw, CKU_SO, b"5678")
    step("bad user type", "C_Login", rw, 7, b"1234")
    step("user login", "C_Login", rw, CKU_USER, b"1234")
    step("user login again", "C_Login", ro, CKU_USER, b"1234")
    step("SO login while the user is", "C_Login", rw, CKU_SO, b"5678")
    step("set PIN in an RO session", "C_SetPIN", ro, b"1234", b"4321")
    step("set PIN, wrong old PIN", "C_SetPIN", rw, b"9999", b"4321")
    step("set PIN, new one too short", "C_SetPIN", rw, b"1234", b"12")
    step("set user PIN", "C_SetPIN", rw, b"1234", b"4321")
    step("init PIN as the user", "C_InitPIN", rw, b"5555")
    step("logout", "C_Logout", rw)
    step("login, old PIN", "C_Login", rw, CKU_USER, b"1234")
    step("login, new PIN", "C_Login", rw, CKU_USER, b"4321")
    step("logout", "C_Logout", rw)
    step("close RO", "C_CloseSession", ro)
    step("user login, RW only", "C_Login", rw, CKU_USER, b"4321")
    step("SO login while the user is, RW only", "C_Login", rw, CKU_SO, b"5678")
    step("logout", "C_Logout", rw)
    step("init PIN, nobody logged in", "C_InitPIN", rw, b"5555")
    step("SO login", "C_Login", rw, CKU_SO, b"5678")
    step("open RO with the SO in", "C_OpenSession", slot, RO)
    step("init PIN too short", "C_InitPIN", rw, b"12")
    step("init PIN", "C_InitPIN", rw, b"2468")
    step("set SO PIN", "C_SetPIN", rw, b"5678", b"87654321")
    step("logout SO", "C_Logout", rw)
    step("SO login, old PIN", "C_Login", rw, CKU_SO, b"5678")
    step("SO login, new PIN", "C_Login", rw, CKU_SO, b"87654321")
    step("logout SO", "C_Logout", rw)
    step("user login, PIN from C_InitPIN", "C_Login", rw, CKU_USER, b"2468")
    flags("after C_InitPIN and C_SetPIN")
    step("init token with a session open", "C_InitToken", slot, b"87654321", LABEL)
    step("close all", "C_CloseAllSessions", slot)
    step("init token, SO PIN too short", "C_InitToken", slot, b"12", LABEL)
    step("init token, wrong SO PIN", "C_InitToken", slot, b"00000000", LABEL)
    step("init token", "C_InitToken", slot, b"87654321", LABEL)
    flags("after C_InitToken")
    (rw,) = step("open RW", "C_OpenSession", slot, RW)
    step("user login after C_InitToken", "C_Login", rw, CKU_USER, b"2468")
    step("SO login", "C_Login", rw, CKU_SO, b"87654321")
    step("init PIN", "C_InitPIN", rw, b"1357")
    step("logout SO", "C_Logout", rw)
    step("user login", "C_Login", rw, CKU_USER, b"1357")
    step("close all", "C_CloseAllSessions", slot)
    return out


def _caller(fn: Callable[[int, list[Any]], list[Any]]) -> Call:
    def call(name: str, *args: Any) -> tuple[int, Any]:
        try:
            return ckr.OK, fn(cid(name), list(args))
        except Pkcs11Error as e:
            return e.rv, None
    return call


@requires_softhsm
def test_pin_functions_answer_as_softhsm(tmp_path: Path) -> None:
    hsm = DirectWay(make_token(tmp_path / "hsm", label="pins", keys=False))
    slot = hsm.begin()
    try:
        expected = scenario(_caller(hsm.call), slot)
    finally:
        hsm.end()
    soft = make_soft_token(tmp_path / "soft", label="pins", keys=False)
    d = Driver(soft_config(Path(soft["path"])))
    try:
        got = scenario(_caller(
            lambda i, a: d.loop.run_until_complete(d.backend.call(i, a))), 1)
    finally:
        d.close()
    assert [w for w, _ in got] == [w for w, _ in expected]
    differ = {w: (g, e) for (w, g), (_, e) in zip(got, expected, strict=True) if g != e}
    assert differ == DIFFERENCES
    # the scenario means something: errors and successes both occur
    assert ("SO login with an RO session", ckr.SESSION_READ_ONLY_EXISTS) in got
    assert ("set PIN, new one too short", ckr.PIN_LEN_RANGE) in got
    assert ("SO login while the user is, RW only", ckr.USER_ANOTHER_ALREADY_LOGGED_IN) in got
    assert ("flags after C_InitToken", ["LOGIN_REQUIRED", "TOKEN_INITIALIZED"]) in got


def test_set_pin_rewraps_the_token_key_and_keeps_the_keys(tmp_path: Path) -> None:
    soft = make_soft_token(tmp_path / "soft", label="pins")
    path = Path(soft["path"])
    st = SoftStore(str(path))
    before = {r: st.wrapping(r) for r in (SO, USER)}
    st.close()
    d = Driver(soft_config(path))
    try:
        (s,) = d("C_OpenSession", 1, RW)
        d("C_Login", s, CKU_USER, b"1234")
        d("C_SetPIN", s, b"1234", b"new-user-pin-77")
        d("C_Logout", s)
        d("C_Login", s, CKU_USER, b"new-user-pin-77")
        tok = d.backend._token
        assert tok is not None
        (priv,) = [h for h, o in tok.objects.items() if o.cls == 3 and o.attrs[0x102] == b"\1"]
        d("C_SignInit", s, Mechanism(0x1041), priv)
        (sig,) = d("C_Sign", s, b"\7" * 32, 64)
        assert len(sig) == 64
        der = tok.key_value(tok.objects[priv])
        assert serialization.load_der_private_key(der, None) is not None
    finally:
        d.close()
    st = SoftStore(str(path))
    after = {r: st.wrapping(r) for r in (SO, USER)}
    st.close()
    assert after[SO] == before[SO]  # the SO's wrap is untouched
    old, new = before[USER], after[USER]
    assert old is not None and new is not None
    assert new[0] != old[0] and new[1] != old[1]  # a fresh salt, a fresh wrap
    data = b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))
    assert b"new-user-pin-77" not in data and der not in data

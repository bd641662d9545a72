"""The soft token behind a real gateway, with real clients through p11-kit-client.so:
pkcs11-tool and python-pkcs11. Signatures are verified with `cryptography`; a gateway
restart keeps the token's keys."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway

pytestmark = pytest.mark.skipif(
    not Path(CLIENT_MODULE).exists() or shutil.which("pkcs11-tool") is None,
    reason="needs p11-kit-client.so and pkcs11-tool")

SO_PIN, USER_PIN = "so-pin-8765", "user-pin-1234"
HERE = Path(__file__).parent


def soft_gateway_config(base: Path) -> Path:
    (base / "so.pin").write_text(SO_PIN + "\n")
    (base / "user.pin").write_text(USER_PIN + "\n")
    (base / "so.pin").chmod(0o600)
    (base / "user.pin").chmod(0o600)
    cfg = base / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={base / 'p11gate.sock'}"
state_dir = "{base / 'state'}"
log_format = "json"

[[backend]]
name = "soft"
type = "soft"
path = "{base / 'soft.db'}"
label = "softtok"
init_so_pin_file = "{base / 'so.pin'}"
init_user_pin_file = "{base / 'user.pin'}"

[[token]]
name = "soft"
backend = "soft"
select = {{ label = "softtok" }}
""")
    return cfg


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return soft_gateway_config(tmp_path_factory.mktemp("soft-gw"))


@pytest.fixture()
def gw(cfg: Path) -> Iterator[Gateway]:
    g = Gateway(cfg)
    yield g
    if g.proc.returncode is None:  # not stopped by the test itself
        alive = g.alive()
        g.stop()
        assert alive, g.log()[-3000:]


def tool(gw: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args],
                       env=gw.client_env(), capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"pkcs11-tool {' '.join(args)} -> {r.returncode}\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def python_pkcs11(gw: Gateway, mode: str) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "pp_client.py"), CLIENT_MODULE, USER_PIN,
                        mode], env=gw.client_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:] + gw.log()[-2000:]
    out: dict = json.loads(r.stdout)
    return out


def _check_pp(out: dict) -> None:
    msg = b"message signed by the soft token"
    point = bytes.fromhex(out["ec_point"])
    assert point[0] == 0x04 and point[1] == 65
    ecpub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    sig = bytes.fromhex(out["ec_sig"])
    ecpub.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                      int.from_bytes(sig[32:], "big")),
                 msg, ec.ECDSA(hashes.SHA256()))
    rsapub = rsa.RSAPublicNumbers(int(out["exponent"], 16), int(out["modulus"], 16)
                                  ).public_key()
    assert rsapub.key_size == 2048
    rsapub.verify(bytes.fromhex(out["rsa_sig"]), msg, padding.PKCS1v15(), hashes.SHA256())
    rsapub.verify(bytes.fromhex(out["pss_sig"]), msg,
                  padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert out["verify_ec"] is True and out["verify_bad"] is False
    assert out["aes_len"] == 32
    assert out["aes_value"] == "sensitive"
    assert {"pp-ec", "pp-rsa", "pp-aes"} <= set(out["labels"])
    assert "pp-aes" not in out["public_labels"] and "pp-ec" in out["public_labels"]
    assert out["random"] == 32  # generate_random takes bits
    assert out["digest"] == hashlib.sha256(msg).hexdigest()


def test_pkcs11_tool_and_python_pkcs11_then_restart(gw: Gateway, cfg: Path,
                                                    tmp_path: Path) -> None:
    r = tool(gw, "-L")
    assert "token label        : soft" in r.stdout
    assert "token initialized" in r.stdout and "PIN initialized" in r.stdout
    r = tool(gw, "-M")
    # (p11-kit-client hides mechanisms it does not know; the full list is a unit test)
    assert "ECDSA-KEY-PAIR-GEN" in r.stdout and "AES-KEY-GEN" in r.stdout
    assert "SHA-1, digest" in r.stdout and "DES" not in r.stdout and "MD5" not in r.stdout
    tool(gw, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type", "EC:prime256v1",
         "--id", "01", "--label", "tool-ec")
    data = tmp_path / "data"
    data.write_bytes(b"pkcs11-tool data for the soft token")
    digest = hashlib.sha256(data.read_bytes()).digest()
    dig = tmp_path / "digest"
    dig.write_bytes(digest)
    sig = tmp_path / "sig"
    tool(gw, "--login", "--pin", USER_PIN, "--sign", "-m", "ECDSA", "--id", "01",
         "-i", str(dig), "-o", str(sig))
    pub = tmp_path / "pub.der"
    tool(gw, "--read-object", "--type", "pubkey", "--id", "01", "-o", str(pub))
    key = load_der_public_key(pub.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    raw = sig.read_bytes()
    assert len(raw) == 64
    key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big")),
               digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    tool(gw, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type", "rsa:2048",
         "--id", "02", "--label", "tool-rsa")
    tool(gw, "--login", "--pin", USER_PIN, "--sign", "-m", "SHA256-RSA-PKCS", "--id", "02",
         "-i", str(data), "-o", str(sig))
    pub2 = tmp_path / "pub2.der"
    tool(gw, "--read-object", "--type", "pubkey", "--id", "02", "-o", str(pub2))
    rkey = load_der_public_key(pub2.read_bytes())
    assert isinstance(rkey, rsa.RSAPublicKey)
    rkey.verify(sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
    r = tool(gw, "-O", "--login", "--pin", USER_PIN)
    assert "Private Key Object; EC" in r.stdout and "tool-ec" in r.stdout
    assert "Private Key Object; RSA" in r.stdout
    r = tool(gw, "-O")  # not logged in: the private key is not listed
    assert "Private Key Object" not in r.stdout and "Public Key Object; EC" in r.stdout
    r = tool(gw, "--login", "--pin", "wrong-pin-0", "-O", check=False)
    assert r.returncode != 0 and "CKR_PIN_INCORRECT" in (r.stdout + r.stderr)
    _check_pp(python_pkcs11(gw, "generate"))

    # restart: the same keys, found and used again
    assert gw.alive(), gw.log()[-3000:]
    gw.stop()
    g2 = Gateway(cfg)
    try:
        _check_pp(python_pkcs11(g2, "reuse"))
        r = tool(g2, "-O", "--login", "--pin", USER_PIN)
        assert "tool-ec" in r.stdout
    finally:
        alive = g2.alive()
        g2.stop()
        assert alive, g2.log()[-3000:]


def test_pkcs11_tool_initialises_a_fresh_token(tmp_path: Path) -> None:
    cfg = tmp_path / "p11gate.toml"
    cfg.write_text(f"""
[server]
listen = "unix:path={tmp_path / 'p11gate.sock'}"
state_dir = "{tmp_path / 'state'}"
log_format = "json"

[[backend]]
name = "soft"
type = "soft"
path = "{tmp_path / 'fresh.db'}"

[[token]]
name = "fresh"
backend = "soft"
select = {{ slot_index = 0 }}
""")
    g = Gateway(cfg)
    try:
        r = tool(g, "-L")
        assert "uninitialized" in r.stdout or "token initialized" not in r.stdout
        tool(g, "--init-token", "--so-pin", SO_PIN, "--label", "fresh")
        tool(g, "--init-pin", "--so-pin", SO_PIN, "--login", "--login-type", "so",
             "--pin", USER_PIN)
        r = tool(g, "-L")
        assert "PIN initialized" in r.stdout
        tool(g, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type", "EC:secp384r1",
             "--id", "07")
        tool(g, "--change-pin", "--login", "--pin", USER_PIN, "--new-pin", "changed-pin-9")
        r = tool(g, "-O", "--login", "--pin", "changed-pin-9")
        assert "Private Key Object; EC" in r.stdout
        r = tool(g, "-O", "--login", "--pin", USER_PIN, check=False)
        assert r.returncode != 0
        assert g.alive()
    finally:
        g.stop()
    data = (tmp_path / "fresh.db").read_bytes()
    assert SO_PIN.encode() not in data and USER_PIN.encode() not in data


def test_a_pin_file_others_can_read_is_refused(tmp_path: Path) -> None:
    cfg = soft_gateway_config(tmp_path)
    (tmp_path / "user.pin").chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "p11gate.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "init_user_pin_file" in r.stderr and "chmod 600" in r.stderr
    assert USER_PIN not in r.stderr and not (tmp_path / "soft.db").exists()

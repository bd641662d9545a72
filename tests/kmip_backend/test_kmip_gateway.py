"""The KMIP back end behind a real gateway, against a real PyKMIP server over TLS with
client certificates, with real clients through p11-kit-client.so (pkcs11-tool and
python-pkcs11). Signatures are verified with `cryptography`; a gateway restart keeps
the keys (the identity map is persisted)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway
from tests.kmip_backend.conftest import USER_PIN, kmip_gateway_config
from tests.kmip_backend.kmip_server import KmipServerProc

pytestmark = pytest.mark.skipif(
    not Path(CLIENT_MODULE).exists() or shutil.which("pkcs11-tool") is None,
    reason="needs p11-kit-client.so and pkcs11-tool")

HERE = Path(__file__).parent
MSG = b"message signed by the KMIP server"


def tool(gw: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args],
                       env=gw.client_env(), capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"pkcs11-tool {' '.join(args)} -> {r.returncode}\n"
                             f"{r.stdout}\n{r.stderr}\n{gw.log()[-2000:]}")
    return r


def python_pkcs11(gw: Gateway, mode: str) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "pp_kmip.py"), CLIENT_MODULE, USER_PIN,
                        mode], env=gw.client_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:] + gw.log()[-2000:]
    out: dict = json.loads(r.stdout)
    return out


def _check_pp(out: dict) -> None:
    pub = rsa.RSAPublicNumbers(int(out["exponent"], 16), int(out["modulus"], 16)).public_key()
    assert pub.key_size == 2048
    pub.verify(bytes.fromhex(out["sig"]), MSG, padding.PKCS1v15(), hashes.SHA256())
    assert out["verify_good"] is True and out["verify_bad"] is False
    assert out["private_exponent"] == "sensitive" and out["aes_value"] == "sensitive"
    assert out["aes_len"] == 32
    assert {"pp-rsa", "pp-aes"} <= set(out["labels"])
    assert out["random"] == "RandomNoRNG"  # PyKMIP has no RNG Retrieve: refused


def test_clients_generate_sign_find_destroy_then_restart(kmip_server: KmipServerProc,
                                                          tmp_path: Path) -> None:
    cfg = kmip_gateway_config(tmp_path, kmip_server)
    gw = Gateway(cfg)
    try:
        r = tool(gw, "-L")
        assert "token label        : kmip" in r.stdout
        r = tool(gw, "-M")
        assert "RSA-PKCS-KEY-PAIR-GEN" in r.stdout and "SHA256-RSA-PKCS" in r.stdout
        assert "ECDSA" not in r.stdout  # the PyKMIP server cannot do EC: not offered
        tool(gw, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type", "rsa:2048",
             "--id", "02", "--label", "tool-rsa")
        data = tmp_path / "data"
        data.write_bytes(b"pkcs11-tool data for the KMIP token")
        sig = tmp_path / "sig"
        tool(gw, "--login", "--pin", USER_PIN, "--sign", "-m", "SHA256-RSA-PKCS",
             "--id", "02", "-i", str(data), "-o", str(sig))
        pub = tmp_path / "pub.der"
        tool(gw, "--read-object", "--type", "pubkey", "--id", "02", "-o", str(pub))
        key = load_der_public_key(pub.read_bytes())
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
        r = tool(gw, "--login", "--pin", USER_PIN, "--keypairgen", "--key-type",
                 "EC:prime256v1", "--label", "tool-ec", check=False)
        # pkcs11-tool reads the mechanism list and stops; python-pkcs11 below asks anyway
        # and hears the gateway's CKR_MECHANISM_INVALID
        assert r.returncode != 0 and "mechanism 1040 not supported" in r.stderr
        r = tool(gw, "-O", "--login", "--pin", USER_PIN)
        assert "Private Key Object; RSA" in r.stdout and "tool-rsa" in r.stdout
        r = tool(gw, "-O")  # not logged in: the private key is not listed
        assert "Private Key Object" not in r.stdout and "Public Key Object; RSA" in r.stdout
        r = tool(gw, "--login", "--pin", "wrong-pin-0", "-O", check=False)
        assert r.returncode != 0 and "CKR_PIN_INCORRECT" in r.stdout + r.stderr
        first = python_pkcs11(gw, "generate")
        assert first["ec"] == "MechanismInvalid"
        _check_pp(first)
    finally:
        alive = gw.alive()
        gw.stop()
        assert alive, gw.log()[-3000:]

    # a new gateway process: the identity map brings back the same keys
    g2 = Gateway(cfg)
    try:
        again = python_pkcs11(g2, "destroy")
        _check_pp(again)
        assert again["modulus"] == first["modulus"]
        assert "pp-aes" not in again["after_destroy"] and "pp-rsa" in again["after_destroy"]
        tool(g2, "--login", "--pin", USER_PIN, "--sign", "-m", "SHA256-RSA-PKCS",
             "--id", "02", "-i", str(data), "-o", str(sig))
        key.verify(sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
        tool(g2, "--login", "--pin", USER_PIN, "--delete-object", "--type", "privkey",
             "--id", "02")
        r = tool(g2, "-O", "--login", "--pin", USER_PIN)
        objs = re.split(r"\n(?=\S)", r.stdout)
        with_02 = [o.split(";")[0] for o in objs if "ID:         02" in o]
        assert with_02 == ["Public Key Object"], r.stdout
    finally:
        alive = g2.alive()
        g2.stop()
        assert alive, g2.log()[-3000:]
    log = (tmp_path / "p11gate.log").read_text()
    assert USER_PIN not in log

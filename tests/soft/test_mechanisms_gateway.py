"""The soft token's mechanisms behind a real gateway, with real clients through
p11-kit-client.so: `pkcs11-tool --test` and python-pkcs11, checked with `cryptography`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tests.gateway_proc import CLIENT_MODULE, Gateway
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config, tool

HERE = Path(__file__).parent
#: what Debian's 0.24 p11-kit-client itself gets wrong (it sends a zero-length random
#: buffer as a size query), the same through `p11-kit server` on SoftHSM
CLIENT_LIMITATIONS = {"ERR: C_GenerateRandom(buf1,0) failed: CKR_BUFFER_TOO_SMALL (0x150)"}


@pytest.fixture()
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(soft_gateway_config(tmp_path))
    yield g
    alive = g.alive()
    g.stop()
    assert alive, g.log()[-3000:]
    assert "Traceback" not in g.log()


def test_pkcs11_tool_test_passes(gw: Gateway) -> None:
    pin = ["--login", "--pin", USER_PIN]
    tool(gw, *pin, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "ec")
    tool(gw, *pin, "--keypairgen", "--key-type", "rsa:2048", "--id", "02", "--label", "rsa")
    tool(gw, *pin, "--keygen", "--key-type", "AES:32", "--sensitive", "--id", "03",
         "--label", "aes")
    r = tool(gw, *pin, "--test", check=False)
    text = r.stdout + r.stderr
    failures = {ln.strip() for ln in text.splitlines() if "ERR" in ln or "failed" in ln}
    assert failures <= CLIENT_LIMITATIONS, text
    assert "all 4 digest functions seem to work" in text
    assert "RSA-PKCS: OK" in text and text.count("RSA-PKCS-OAEP") >= 2
    assert text.count("\nOK") + text.count(": OK") >= 4
    listed = tool(gw, "-M").stdout
    for name in ("SHA1-RSA-PKCS", "RSA-PKCS-OAEP", "SHA256-HMAC", "ECDSA-SHA1",
                 "GENERIC-SECRET-KEY-GEN", "AES-ECB"):
        assert name in listed
    assert "keySize={256,521}" in listed


def test_python_pkcs11_mechanisms(gw: Gateway) -> None:
    r = subprocess.run([sys.executable, str(HERE / "pp_mechanisms.py"), CLIENT_MODULE,
                        USER_PIN], env=gw.client_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + gw.log()[-2000:]
    out = json.loads(r.stdout)
    msg = b"soft token mechanisms through python-pkcs11"
    for name, curve in (("secp384r1", ec.SECP384R1()), ("secp521r1", ec.SECP521R1())):
        point = bytes.fromhex(out[f"{name}_point"])
        raw = point[3:] if point[1] == 0x81 else point[2:]
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
        sig = bytes.fromhex(out[f"{name}_sig"])
        n = (curve.key_size + 7) // 8
        assert len(sig) == 2 * n
        key.verify(encode_dss_signature(int.from_bytes(sig[:n], "big"),
                                        int.from_bytes(sig[n:], "big")),
                   msg, ec.ECDSA(hashes.SHA1()))
    rsapub = rsa.RSAPublicNumbers(65537, int(out["modulus"], 16)).public_key()
    rsapub.verify(bytes.fromhex(out["sha1_rsa_sig"]), msg, padding.PKCS1v15(), hashes.SHA1())
    assert bytes.fromhex(out["oaep_round_trip"]) == b"oaep secret"
    assert out["hmac_len"] == 32 and out["hmac_verify"] is True
    assert out["hmac_verify_bad"] is False
    assert bytes.fromhex(out["ecb_round_trip"]) == bytes(range(32)) and out["ecb_len"] == 32
    for name in ("sha1", "sha384", "sha512"):
        assert out[f"digest_{name}"] == hashlib.new(name, msg).hexdigest()
    assert {0x1, 0x6, 0x9, 0x220, 0x251, 0x350, 0x1041, 0x1081} <= set(out["mechanisms"])

"""The soft token's mechanisms behind a real gateway, with real clients through
p11-kit-client.so (`pkcs11-tool --test`, python-pkcs11) and raw frames of the newer
protocol, checked with `cryptography`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient
from tests.soft.helpers import cid
from tests.soft.mech_driver import ED25519_OID, P521, A
from tests.soft.test_soft_gateway import USER_PIN, soft_gateway_config, tool

from p11gate.codec import V026
from p11gate.codec.values import AttrRequest, GcmParams, Mechanism

HERE = Path(__file__).parent
#: what Debian's 0.24 p11-kit-client itself gets wrong (it sends a zero-length random
#: buffer as a size query), the same through `p11-kit server` on SoftHSM
CLIENT_LIMITATIONS = "ERR: C_GenerateRandom(buf1,0) failed"


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
    assert all(f.startswith(CLIENT_LIMITATIONS) for f in failures), text
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


def test_newer_dialect_reaches_every_family(gw: Gateway) -> None:
    """A client speaking the ≥ 0.25.6 protocol (raw frames) gets the mechanisms Debian's
    0.24 client cannot carry: EdDSA, ECDSA-SHA512 on P-521, GCM, AES key wrap."""
    c = RawClient(gw.path, version=2, dialect=V026)
    c.initialize()
    (slots,) = c.call(cid("C_GetSlotList"), [1, 8])
    (mechs,) = c.call(cid("C_GetMechanismList"), [slots[0], 128])
    assert {0x1055, 0x1057, 0x1046, 0x1087, 0x2109, 0x210A, 0x1050} <= set(mechs)
    (s,) = c.call(cid("C_OpenSession"), [slots[0], 6])
    c.call(cid("C_Login"), [s, 1, USER_PIN.encode()])
    pub, priv = c.call(cid("C_GenerateKeyPair"), [s, Mechanism(0x1055), [A(0x180, ED25519_OID)],
                                                  [A(0x108, 1)]])
    attrs, _rv = c.call(cid("C_GetAttributeValue"), [s, pub, [AttrRequest(0x181, 64)]])
    key = ed25519.Ed25519PublicKey.from_public_bytes(attrs[0].value[2:])
    c.call(cid("C_SignInit"), [s, Mechanism(0x1057), priv])
    (sig,) = c.call(cid("C_Sign"), [s, b"through the gateway", 64])
    key.verify(sig, b"through the gateway")
    _pub, priv = c.call(cid("C_GenerateKeyPair"), [s, Mechanism(0x1040), [A(0x180, P521)],
                                                   [A(0x108, 1)]])
    c.call(cid("C_SignInit"), [s, Mechanism(0x1046), priv])
    c.call(cid("C_SignUpdate"), [s, b"part"])
    (sig,) = c.call(cid("C_SignFinal"), [s, 256])
    assert len(sig) == 132
    value, kek_value = os.urandom(32), os.urandom(32)
    (kek,) = c.call(cid("C_CreateObject"), [s, [A(0, 4), A(0x100, 0x1F), A(0x11, kek_value),
                                                A(0x106, 1), A(0x104, 1)]])
    (k,) = c.call(cid("C_CreateObject"), [s, [A(0, 4), A(0x100, 0x1F), A(0x11, value),
                                              A(0x162, 1)]])
    (blob,) = c.call(cid("C_WrapKey"), [s, Mechanism(0x2109), kek, k, 64])
    assert keywrap.aes_key_unwrap(kek_value, blob) == value
    nonce = os.urandom(12)
    c.call(cid("C_EncryptInit"), [s, Mechanism(0x1087, GcmParams(nonce, 96, b"", 128)), kek])
    (ct,) = c.call(cid("C_Encrypt"), [s, b"gcm", 64])
    assert AESGCM(kek_value).decrypt(nonce, ct, None) == b"gcm"
    c.close()

"""Demo mode serves the built-in soft token (no SoftHSM involved) with the documented
keys, and its file holds nothing sensitive in clear: not the private keys, not the PINs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tests.gateway_proc import CLIENT_MODULE

from p11gate.backends.soft.objects import CKA_ID, CKO_PRIVATE_KEY
from p11gate.backends.soft.store import SoftStore
from p11gate.backends.soft.token import CKU_USER, SLOT, SoftToken
from p11gate.demo import DEMO_SO_PIN, DEMO_TOKEN_FILE


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
                    if p.exists())


def _private_keys(path: Path) -> dict[bytes, bytes]:
    """CKA_ID → DER of each private key, opened in-process with the demo user PIN."""
    token = SoftToken(SoftStore(str(path)))
    try:
        (s,) = token.open_session([SLOT, 6])
        asyncio.run(token.login_call([s, CKU_USER, b"1234"]))
        return {bytes(o.attrs[CKA_ID]): token.key_value(o)  # type: ignore[misc]
                for o in token.objects.values() if o.cls == CKO_PRIVATE_KEY}
    finally:
        token.store.close()


def test_demo_mode_is_a_soft_token_with_nothing_in_clear(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # no SoftHSM: its configuration variable points nowhere, and it is not needed
    env = {**os.environ, "SOFTHSM2_CONF": str(tmp_path / "absent.conf")}
    proc = subprocess.Popen([sys.executable, "-m", "p11gate.cli", "serve", "--state-dir",
                             str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    digest = hashlib.sha256(b"demo data").digest()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("P11_KIT_SERVER_ADDRESS=unix:path="), line
        cenv = {**env, "P11_KIT_SERVER_ADDRESS": line.split("=", 1)[1].split(";", 1)[0]}

        def tool(*args: str) -> subprocess.CompletedProcess[bytes]:
            r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args], env=cenv,
                               capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr
            return r

        out = tool("-L").stdout.decode()
        assert "token label        : demo" in out and "token model        : soft" in out
        out = tool("-O", "--login", "--pin", "1234").stdout.decode()
        assert "Private Key Object; EC" in out and "Private Key Object; RSA" in out
        assert "demo-ec" in out and "demo-rsa" in out
        (tmp_path / "digest").write_bytes(digest)
        sig = tool("--login", "--pin", "1234", "--sign", "--mechanism", "ECDSA", "--id", "01",
                   "-i", str(tmp_path / "digest")).stdout
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    path = state / DEMO_TOKEN_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    keys = _private_keys(path)
    assert set(keys) == {b"\x01", b"\x02"}
    eck = serialization.load_der_private_key(keys[b"\x01"], None)
    rsak = serialization.load_der_private_key(keys[b"\x02"], None)
    assert isinstance(eck, ec.EllipticCurvePrivateKey) and eck.curve.name == "secp256r1"
    assert isinstance(rsak, rsa.RSAPrivateKey) and rsak.key_size == 2048
    # the signature made through the gateway is by the key found in the file
    n = len(sig) // 2
    eck.public_key().verify(
        encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big")),
        digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    data = _file_bytes(path)
    rsa_nums = rsak.private_numbers()
    secrets = [keys[b"\x01"], keys[b"\x02"],
               eck.private_numbers().private_value.to_bytes(32, "big"),
               rsa_nums.d.to_bytes(256, "big"), rsa_nums.p.to_bytes(128, "big"),
               b"1234", DEMO_SO_PIN.encode()]
    for secret in secrets:
        assert secret not in data and secret.hex().encode() not in data
    # a second start reuses the token: same keys
    from p11gate.demo import demo_config

    demo_config(state)
    assert _private_keys(path) == keys

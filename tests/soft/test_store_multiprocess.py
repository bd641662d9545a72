"""Two real gateway processes serve one soft token file at once (SQLite WAL, one
transaction per change): keys generated through either are usable through both, while
both are creating and signing, and a deletion through one is seen by the other."""

from __future__ import annotations

import hashlib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tests.gateway_proc import CLIENT_MODULE, Gateway, write_config
from tests.soft_token import make_soft_token

ROUNDS = 4


def tool(gw: Gateway, *args: str) -> bytes:
    r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, *args],
                       env=gw.client_env(), capture_output=True, timeout=120)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def sign(gw: Gateway, kid: str, digest_file: Path) -> bytes:
    return tool(gw, "--login", "--pin", "1234", "--sign", "--mechanism", "ECDSA", "--id", kid,
                "-i", str(digest_file))


def verify(gw: Gateway, kid: str, sig: bytes, digest: bytes, tmp: Path) -> None:
    out = tmp / f"pub-{kid}.der"
    tool(gw, "--read-object", "--type", "pubkey", "--id", kid, "-o", str(out))
    key = load_der_public_key(out.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    n = len(sig) // 2
    der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_two_gateways_create_and_use_keys_at_once(tmp_path: Path) -> None:
    token = make_soft_token(tmp_path / "soft")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    gws = [Gateway(write_config(tmp_path / name, token)) for name in ("a", "b")]
    digest = hashlib.sha256(b"two processes, one file").digest()
    (tmp_path / "digest").write_bytes(digest)

    def work(i: int) -> list[tuple[str, bytes]]:
        """Gateway i generates keys and signs with each new one and the shared key 01."""
        gw, made = gws[i], []
        for r in range(ROUNDS):
            kid = f"{0xA0 + i:02x}{r:02x}"
            tool(gw, "--login", "--pin", "1234", "--keypairgen", "--key-type",
                 "EC:prime256v1", "--id", kid, "--label", f"k-{kid}")
            made.append((kid, sign(gw, kid, tmp_path / "digest")))
            made.append(("01", sign(gw, "01", tmp_path / "digest")))
        return made

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(work, range(2)))
        for i, made in enumerate(results):
            other = gws[1 - i]
            for kid, sig in made:
                # a key made through one gateway, its signature checked with the public
                # key read through the other
                verify(other, kid, sig, digest, tmp_path)
                if kid != "01":
                    verify(other, kid, sign(other, kid, tmp_path / "digest"), digest,
                           tmp_path)
        listings = [tool(g, "-O", "--login", "--pin", "1234").decode() for g in gws]
        for listing in listings:
            assert listing.count("Private Key Object; EC") == 1 + 2 * ROUNDS, listing
        # a deletion through b is seen through a
        tool(gws[1], "--login", "--pin", "1234", "--delete-object", "--type", "privkey",
             "--id", "a000")
        r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "--login", "--pin",
                            "1234", "--sign", "--mechanism", "ECDSA", "--id", "a000", "-i",
                            str(tmp_path / "digest")], env=gws[0].client_env(),
                           capture_output=True, timeout=120)
        assert r.returncode != 0
        assert tool(gws[0], "-O", "--login", "--pin", "1234").decode().count(
            "Private Key Object; EC") == 2 * ROUNDS
    finally:
        alive = [g.alive() for g in gws]
        codes = [g.stop() for g in gws]
    assert alive == [True, True] and codes == [0, 0], [g.log()[-2000:] for g in gws]
    for g in gws:
        assert not [r for r in g.records() if r.get("levelname") == "ERROR"
                    or "store failed" in str(r.get("msg"))], g.log()[-2000:]

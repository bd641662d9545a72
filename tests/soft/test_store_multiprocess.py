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
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, rv_of, write_config
from tests.soft_token import make_soft_token

from p11gate.codec import Attribute, ckr
from p11gate.codec.calls import CALLS_BY_NAME

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


def test_init_token_through_one_gateway_cuts_the_other_off(tmp_path: Path) -> None:
    """Raw RPC: a client logged in through gateway b keeps no access to the old keys
    after a C_InitToken through gateway a (the token key b held is gone); b's token then
    works with the new PINs."""
    ids = {n: c.id for n, c in CALLS_BY_NAME.items()}
    token = make_soft_token(tmp_path / "soft")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    ga, gb = (Gateway(write_config(tmp_path / name, token)) for name in ("a", "b"))
    try:
        b = RawClient(gb.path)
        b.initialize()
        ((slot_b, *_),) = b.call(ids["C_GetSlotList"], [1, 8])
        (sb,) = b.call(ids["C_OpenSession"], [slot_b, 6])
        b.call(ids["C_Login"], [sb, 1, b"1234"])
        (key,) = b.find(sb, [Attribute(0, 3, 8), Attribute(0x102, b"\x01", 1)])
        b.call(ids["C_SignInit"], [sb, (0x1041, None), key])
        b.call(ids["C_Sign"], [sb, b"\1" * 32, 64])
        a = RawClient(ga.path)
        a.initialize()
        ((slot_a, *_),) = a.call(ids["C_GetSlotList"], [1, 8])
        assert rv_of(a, ids["C_InitToken"], [slot_a, b"5678", b"anchor".ljust(32)]) == ckr.OK
        # b's client: the old key is gone, nothing private is left to it
        assert rv_of(b, ids["C_SignInit"], [sb, (0x1041, None), key]) in (
            ckr.KEY_HANDLE_INVALID, ckr.USER_NOT_LOGGED_IN, ckr.OBJECT_HANDLE_INVALID)
        assert b.find(sb, [Attribute(0, 3, 8)]) == []
        # a sets the new user PIN; a new session through b logs in with it, not the old
        (sa,) = a.call(ids["C_OpenSession"], [slot_a, 6])
        a.call(ids["C_Login"], [sa, 0, b"5678"])
        a.call(ids["C_InitPIN"], [sa, b"8642"])
        a.close()
        b.close()
        b = RawClient(gb.path)
        b.initialize()
        (sb,) = b.call(ids["C_OpenSession"], [slot_b, 6])
        assert rv_of(b, ids["C_Login"], [sb, 1, b"1234"]) == ckr.PIN_INCORRECT
        assert rv_of(b, ids["C_Login"], [sb, 1, b"8642"]) == ckr.OK
        assert b.find(sb, []) == []
        # a key b makes now is sealed under the new token key: a can use it
        ec_params = bytes.fromhex("06082a8648ce3d030107")
        b.call(ids["C_GenerateKeyPair"], [sb, (0x1040, None),
               [Attribute(1, 1, 1), Attribute(0x180, ec_params, len(ec_params)),
                Attribute(0x102, b"\x09", 1)],
               [Attribute(1, 1, 1), Attribute(0x102, b"\x09", 1)]])
        b.close()
        a = RawClient(ga.path)
        a.initialize()
        (sa,) = a.call(ids["C_OpenSession"], [slot_a, 6])
        a.call(ids["C_Login"], [sa, 1, b"8642"])
        (key,) = a.find(sa, [Attribute(0, 3, 8), Attribute(0x102, b"\x09", 1)])
        a.call(ids["C_SignInit"], [sa, (0x1041, None), key])
        (sig,) = a.call(ids["C_Sign"], [sa, b"\2" * 32, 64])
        assert len(sig) == 64
        a.close()
    finally:
        alive = [g.alive() for g in (ga, gb)]
        codes = [g.stop() for g in (ga, gb)]
    assert alive == [True, True] and codes == [0, 0], gb.log()[-2000:]

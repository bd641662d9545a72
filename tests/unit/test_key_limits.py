"""The key-size checker: generation requests beyond ``max_key_bits`` are refused with
CKR_KEY_SIZE_RANGE before any backend sees them; unreadable sizes with
CKR_TEMPLATE_INCONSISTENT; what the gateway cannot size is left to the module."""

from __future__ import annotations

from typing import Any

import pytest
from tests.softhsm import MODULE

from p11gate.backends.limits_config import KeyBitsConfig
from p11gate.codec import Attribute, Mechanism, ckr
from p11gate.config import parse_config
from p11gate.errors import Pkcs11Error
from p11gate.frontend import key_limits as kl

LIMITS = KeyBitsConfig()
GEN_KEY, GEN_PAIR = kl.C_GenerateKey, kl.C_GenerateKeyPair
P256 = bytes.fromhex("06082a8648ce3d030107")
P521 = bytes.fromhex("06052b81040023")
UNKNOWN_CURVE = bytes.fromhex("06062b0601040101")


def ulong(t: int, v: int) -> Attribute:
    return Attribute(t, v, 8)


def blob(t: int, v: bytes) -> Attribute:
    return Attribute(t, v, len(v))


def der(tag: int, body: bytes) -> bytes:
    n = len(body)
    head = bytes([n]) if n < 0x80 else bytes([0x82, n >> 8, n & 0xFF])
    return bytes([tag]) + head + body


def explicit_curve(prime_bits: int) -> bytes:
    p = (1 << (prime_bits - 1)) | 1
    field = der(0x30, der(0x06, bytes.fromhex("2a8648ce3d0101"))
                + der(0x02, p.to_bytes(prime_bits // 8 + 1, "big")))
    return der(0x30, der(0x02, b"\x01") + field + der(0x30, b""))


def rv(call_id: int, mech: int, *templates: list[Attribute],
       limits: KeyBitsConfig = LIMITS) -> int:
    args: list[Any] = [1, Mechanism(mech, None), *templates]
    try:
        kl.check(limits, call_id, args)
    except Pkcs11Error as e:
        return e.rv
    return ckr.OK


@pytest.mark.parametrize(("bits", "expected"), [
    (2048, ckr.OK), (8192, ckr.OK), (8193, ckr.KEY_SIZE_RANGE), (16384, ckr.KEY_SIZE_RANGE)])
def test_rsa_modulus(bits: int, expected: int) -> None:
    assert rv(GEN_PAIR, kl.CKM_RSA_PKCS_KEY_PAIR_GEN,
              [ulong(kl.CKA_MODULUS_BITS, bits)], []) == expected


def test_rsa_size_in_the_private_template_counts_too() -> None:
    assert rv(GEN_PAIR, kl.CKM_RSA_X9_31_KEY_PAIR_GEN, [],
              [ulong(kl.CKA_MODULUS_BITS, 16384)]) == ckr.KEY_SIZE_RANGE


def test_an_unreadable_size_is_refused_and_a_missing_one_left_to_the_module() -> None:
    assert rv(GEN_PAIR, kl.CKM_RSA_PKCS_KEY_PAIR_GEN,
              [blob(kl.CKA_MODULUS_BITS, b"\x00" * 3)], []) == ckr.TEMPLATE_INCONSISTENT
    assert rv(GEN_PAIR, kl.CKM_RSA_PKCS_KEY_PAIR_GEN, [], []) == ckr.OK
    assert rv(GEN_PAIR, kl.CKM_RSA_PKCS_KEY_PAIR_GEN,
              [blob(kl.CKA_MODULUS_BITS, (16384).to_bytes(8, "little"))],
              []) == ckr.KEY_SIZE_RANGE


def test_ec_curves() -> None:
    ec = kl.CKM_EC_KEY_PAIR_GEN
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, P256)], []) == ckr.OK
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, P521)], []) == ckr.OK
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, P521)], [],
              limits=KeyBitsConfig(ec=384)) == ckr.KEY_SIZE_RANGE
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, UNKNOWN_CURVE)], []) == ckr.OK
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, explicit_curve(256))], []) == ckr.OK
    assert rv(GEN_PAIR, ec, [blob(kl.CKA_EC_PARAMS, explicit_curve(4096))],
              []) == ckr.KEY_SIZE_RANGE
    assert rv(GEN_PAIR, kl.CKM_EC_EDWARDS_KEY_PAIR_GEN,
              [blob(kl.CKA_EC_PARAMS, der(0x13, b"edwards448"))], [],
              limits=KeyBitsConfig(ec=384)) == ckr.KEY_SIZE_RANGE


@pytest.mark.parametrize("bad", [b"\x06", b"\x06\x05\x2b", P256 + b"\x00", b"\x30\x84\xff\xff",
                                 der(0x30, b"\x02\x01"), b"\xa0\x00"])
def test_malformed_ec_params_are_refused(bad: bytes) -> None:
    assert rv(GEN_PAIR, kl.CKM_EC_KEY_PAIR_GEN,
              [blob(kl.CKA_EC_PARAMS, bad)], []) == ckr.TEMPLATE_INCONSISTENT


def test_dh_and_dsa_primes_and_parameter_generation() -> None:
    big_prime = blob(kl.CKA_PRIME, b"\xff" * 1024)  # 8192 bits
    assert rv(GEN_PAIR, kl.CKM_DH_PKCS_KEY_PAIR_GEN, [big_prime], []) == ckr.KEY_SIZE_RANGE
    assert rv(GEN_PAIR, kl.CKM_DH_PKCS_KEY_PAIR_GEN,
              [blob(kl.CKA_PRIME, b"\xff" * 256)], []) == ckr.OK
    assert rv(GEN_PAIR, kl.CKM_DSA_KEY_PAIR_GEN, [big_prime], []) == ckr.KEY_SIZE_RANGE
    for mech, ok, too_big in [(kl.CKM_DH_PKCS_PARAMETER_GEN, 2048, 3072),
                              (kl.CKM_X9_42_DH_PARAMETER_GEN, 2048, 4096),
                              (kl.CKM_DSA_PARAMETER_GEN, 3072, 4096)]:
        assert rv(GEN_KEY, mech, [ulong(kl.CKA_PRIME_BITS, ok)]) == ckr.OK
        assert rv(GEN_KEY, mech, [ulong(kl.CKA_PRIME_BITS, too_big)]) == ckr.KEY_SIZE_RANGE


def test_secret_key_length() -> None:
    aes = 0x1080
    assert rv(GEN_KEY, aes, [ulong(kl.CKA_VALUE_LEN, 32)]) == ckr.OK
    assert rv(GEN_KEY, 0x350, [ulong(kl.CKA_VALUE_LEN, 1024)]) == ckr.OK
    assert rv(GEN_KEY, 0x350, [ulong(kl.CKA_VALUE_LEN, 1 << 20)]) == ckr.KEY_SIZE_RANGE


def test_other_calls_are_not_checked() -> None:
    create = 20
    assert rv(create, 0, [ulong(kl.CKA_MODULUS_BITS, 1 << 20)]) == ckr.OK


def test_config_defaults_bounds_and_pool_limits() -> None:
    raw: dict[str, Any] = {
        "backend": [
            {"name": "a", "module": MODULE, "threads": 4,
             "max_key_bits": {"rsa": 4096, "ec": 384}},
            {"name": "b", "module": MODULE, "threads": 8}],
        "pool": [{"name": "p", "members": [{"backend": "a"}, {"backend": "b"}]}],
        "token": [{"name": "t", "backend": "p"}],
    }
    cfg = parse_config(raw, "f.toml")
    b = cfg.backend_named("b")
    assert (b.max_key_bits.rsa, b.keygen_timeout, b.calls_per_identity) == (8192, 300.0, 7)
    assert cfg.backend_named("a").calls_per_identity == 3
    pooled = kl.limits_for(cfg, "p")
    assert (pooled.rsa, pooled.ec, pooled.dh) == (4096, 384, 4096)
    from p11gate.config import ConfigError

    raw["backend"][0]["max_calls_per_identity"] = 5
    with pytest.raises(ConfigError, match=r"max_calls_per_identity .* more than threads"):
        parse_config(raw, "f.toml")
    raw["backend"][0]["max_calls_per_identity"] = 1
    raw["backend"][0]["max_key_bits"] = {"rsa": 100}
    with pytest.raises(ConfigError, match=r"backend\[0\].max_key_bits.rsa"):
        parse_config(raw, "f.toml")

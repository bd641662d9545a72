"""PKCS#11 ↔ KMIP: mechanisms, the attributes the gateway keeps, public values.

Only what PyKMIP's client can express and a KMIP server implements is listed; everything
else is CKR_MECHANISM_INVALID at C_*Init, never emulated in the gateway. EC key
generation is absent: PyKMIP's CreateKeyPair cannot carry the curve (Recommended Curve)
and PyKMIP's server generates RSA pairs only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from kmip.core import enums
from kmip.pie import objects as kobj

from ...codec import ckr
from ...errors import Pkcs11Error
from ..soft import objects as O

CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_OAEP, CKM_AES_KEY_GEN = 0x0, 0x9, 0x1080
CKM_AES_CBC_PAD = 0x1085
CKF_ENCRYPT, CKF_DECRYPT, CKF_SIGN, CKF_VERIFY = 0x100, 0x200, 0x800, 0x2000
CKF_GENERATE, CKF_GENERATE_KEY_PAIR = 0x8000, 0x10000

H = enums.HashingAlgorithm
_HASH_LEN = {H.SHA_224: 28, H.SHA_256: 32, H.SHA_384: 48, H.SHA_512: 64, H.SHA_1: 20}
#: CKM/CKG hash ids (PSS/OAEP parameters) → KMIP hashing algorithm
CK_HASH = {0x220: H.SHA_1, 0x255: H.SHA_224, 0x250: H.SHA_256, 0x260: H.SHA_384,
           0x270: H.SHA_512}
CKG_MGF1 = {H.SHA_1: 1, H.SHA_224: 5, H.SHA_256: 2, H.SHA_384: 3, H.SHA_512: 4}


class SignMech(NamedTuple):
    hash: enums.HashingAlgorithm
    pss: bool


#: hash-and-sign RSA mechanisms (the KMIP server hashes; raw CKM_RSA_PKCS is not offered)
SIGN = {
    0x40: SignMech(H.SHA_256, False), 0x41: SignMech(H.SHA_384, False),
    0x42: SignMech(H.SHA_512, False), 0x46: SignMech(H.SHA_224, False),
    0x43: SignMech(H.SHA_256, True), 0x44: SignMech(H.SHA_384, True),
    0x45: SignMech(H.SHA_512, True), 0x47: SignMech(H.SHA_224, True),
}
RSA_BITS = (2048, 4096)
MECHANISMS: dict[int, tuple[int, int, int]] = {
    CKM_RSA_PKCS_KEY_PAIR_GEN: (*RSA_BITS, CKF_GENERATE_KEY_PAIR),
    CKM_AES_KEY_GEN: (16, 32, CKF_GENERATE),
    CKM_AES_CBC_PAD: (16, 32, CKF_ENCRYPT | CKF_DECRYPT),
    CKM_RSA_PKCS_OAEP: (*RSA_BITS, CKF_ENCRYPT | CKF_DECRYPT),
    **{m: (*RSA_BITS, CKF_SIGN | CKF_VERIFY) for m in SIGN},
}


def key_type(mech: int) -> int:
    """The CKA_KEY_TYPE a key must have for ``mech`` (C_*Init checks it: the server
    would otherwise get an AES decryption with an RSA key, or OAEP with an AES key)."""
    return O.CKK_AES if mech == CKM_AES_CBC_PAD else O.CKK_RSA


def sign_parameters(mech: int, param: Any, modulus_bits: int) -> dict[str, Any]:
    """KMIP Cryptographic Parameters for a sign/verify mechanism, or the CKR why not."""
    m = SIGN.get(mech)
    if m is None:
        raise Pkcs11Error(ckr.MECHANISM_INVALID)
    p: dict[str, Any] = {"cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
                         "hashing_algorithm": m.hash}
    if not m.pss:
        p["padding_method"] = enums.PaddingMethod.PKCS1v15
        return p
    # PyKMIP's server signs PSS with MGF1 of the message hash and the largest salt; any
    # other parameters would be silently different, so they are refused
    max_salt = (modulus_bits - 1 + 7) // 8 - _HASH_LEN[m.hash] - 2
    try:
        hash_alg, mgf, salt = int(param[0]), int(param[1]), int(param[2])
    except (TypeError, IndexError, ValueError):
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID) from None
    if CK_HASH.get(hash_alg) != m.hash or CKG_MGF1[m.hash] != mgf or salt != max_salt:
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID,
                          f"the KMIP server signs PSS with salt length {max_salt}")
    p["padding_method"] = enums.PaddingMethod.PSS
    return p


def cipher_parameters(mech: int, param: Any) -> tuple[dict[str, Any], bytes | None]:
    if mech == CKM_AES_CBC_PAD:
        iv = param[0] if isinstance(param, tuple) else param
        if not isinstance(iv, bytes) or len(iv) != 16:
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "a 16-byte IV")
        return ({"cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
                 "block_cipher_mode": enums.BlockCipherMode.CBC,
                 "padding_method": enums.PaddingMethod.PKCS5}, iv)
    if mech == CKM_RSA_PKCS_OAEP:
        try:
            hash_alg, mgf, source = int(param[0]), int(param[1]), int(param[2])
        except (TypeError, IndexError, ValueError):
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID) from None
        h = CK_HASH.get(hash_alg)
        if h is None or CKG_MGF1[h] != mgf or source not in (0, 1) or param[3]:
            raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "OAEP: MGF1 of the same hash, "
                              "no label")
        return ({"cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
                 "padding_method": enums.PaddingMethod.OAEP, "hashing_algorithm": h}, None)
    raise Pkcs11Error(ckr.MECHANISM_INVALID)


def rsa_public_attrs(der: bytes) -> dict[int, int | bytes]:
    """CKA_MODULUS etc. from the DER public key a KMIP Get returns."""
    key = load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise Pkcs11Error(ckr.DEVICE_ERROR, "the server returned a public key that is not RSA")
    n = key.public_numbers()
    return {O.CKA_MODULUS: n.n.to_bytes((n.n.bit_length() + 7) // 8, "big"),
            O.CKA_PUBLIC_EXPONENT: n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"),
            O.CKA_MODULUS_BITS: key.key_size}


#: usages (and rights) a template may switch off: the object then has them off, in the
#: attributes the gateway checks and in the KMIP usage mask
CAPABILITIES = frozenset({
    O.CKA_ENCRYPT, O.CKA_DECRYPT, O.CKA_SIGN, O.CKA_VERIFY, O.CKA_WRAP, O.CKA_UNWRAP,
    O.CKA_DERIVE, O.CKA_SIGN_RECOVER, O.CKA_VERIFY_RECOVER, O.CKA_EXTRACTABLE,
    O.CKA_MODIFIABLE, O.CKA_COPYABLE, O.CKA_DESTROYABLE, O.CKA_TRUSTED})
#: restrictions: an object may have one it was not asked for, never lack one asked for
RESTRICTIONS = frozenset({O.CKA_PRIVATE, O.CKA_SENSITIVE, O.CKA_ALWAYS_AUTHENTICATE,
                          O.CKA_WRAP_WITH_TRUSTED})
#: what a template gives that becomes the object's value or public numbers (checked
#: where they are used) rather than an attribute kept as given; the dates are for
#: reference only (PKCS#11 gives them no meaning), CKA_SUBJECT of a key and a
#: certificate's category too
_CONSUMED = frozenset({
    O.CKA_CERTIFICATE_CATEGORY,
    O.CKA_VALUE, O.CKA_MODULUS, O.CKA_PUBLIC_EXPONENT, O.CKA_PRIVATE_EXPONENT, O.CKA_PRIME_1,
    O.CKA_PRIME_2, O.CKA_EXPONENT_1, O.CKA_EXPONENT_2, O.CKA_COEFFICIENT, O.CKA_VALUE_LEN,
    O.CKA_MODULUS_BITS, O.CKA_CERTIFICATE_TYPE, O.CKA_SUBJECT, O.CKA_ISSUER,
    O.CKA_SERIAL_NUMBER, O.CKA_START_DATE, O.CKA_END_DATE})


def check_template(tpl: dict[int, int | bytes], kept: dict[int, int | bytes]) -> None:
    """Refuse a template the object made from it would not honour. The KMIP token used
    to drop what it cannot keep: a key asked for without CKA_DECRYPT, not destroyable,
    with CKA_ALLOWED_MECHANISMS or a vendor attribute came out able to do all of it.
    An attribute not kept is CKR_ATTRIBUTE_TYPE_INVALID, one kept with another value
    CKR_TEMPLATE_INCONSISTENT; a usage asked for and not given, or a restriction given
    and not asked for, leave the object stricter than asked and pass."""
    for t, v in tpl.items():
        have = kept.get(t)
        if t in _CONSUMED or have == v:
            continue
        if (t in CAPABILITIES and not have) or (t in RESTRICTIONS and (have or not v)):
            continue
        if have is None:
            raise Pkcs11Error(ckr.ATTRIBUTE_TYPE_INVALID, f"the KMIP token keeps no {t:#x}")
        raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, f"attribute {t:#x}")


def usage_mask(a: dict[int, int | bytes]) -> list[enums.CryptographicUsageMask]:
    """The KMIP usage mask of an object with the attributes ``a``."""
    U = enums.CryptographicUsageMask
    return [m for attr, m in ((O.CKA_SIGN, U.SIGN), (O.CKA_VERIFY, U.VERIFY),
                              (O.CKA_ENCRYPT, U.ENCRYPT), (O.CKA_DECRYPT, U.DECRYPT))
            if a.get(attr)]


def key_attrs(cls: int, key_type: int, tpl: dict[int, int | bytes],
              generated: bool) -> dict[int, int | bytes]:
    """The attributes the gateway reports (and keeps) for a KMIP key: fixed ones, with
    the usages ``tpl`` switches off switched off."""
    a = _fixed_attrs(cls, key_type, tpl, generated)
    for t in CAPABILITIES & a.keys():
        if tpl.get(t) == 0:
            a[t] = 0
    return a


def _fixed_attrs(cls: int, key_type: int, tpl: dict[int, int | bytes],
                 generated: bool) -> dict[int, int | bytes]:
    public = cls in (O.CKO_PUBLIC_KEY, O.CKO_CERTIFICATE)
    a: dict[int, int | bytes] = {
        O.CKA_CLASS: cls, O.CKA_TOKEN: 1,
        # public keys and certificates are private if asked; the others always are
        O.CKA_PRIVATE: int(bool(tpl.get(O.CKA_PRIVATE, 0))) if public else 1,
        O.CKA_LABEL: tpl.get(O.CKA_LABEL, b""), O.CKA_ID: tpl.get(O.CKA_ID, b""),
        O.CKA_MODIFIABLE: 0, O.CKA_COPYABLE: 0, O.CKA_DESTROYABLE: 1,
    }
    if cls == O.CKO_CERTIFICATE:
        a[O.CKA_CERTIFICATE_TYPE] = O.CKC_X_509
        return a
    a.update({O.CKA_KEY_TYPE: key_type, O.CKA_LOCAL: 1 if generated else 0,
              O.CKA_DERIVE: 0})
    if cls == O.CKO_PUBLIC_KEY:
        a.update({O.CKA_VERIFY: 1, O.CKA_ENCRYPT: 1, O.CKA_WRAP: 0, O.CKA_VERIFY_RECOVER: 0})
    else:
        # private material never leaves the KMIP server through the gateway
        # (an imported key was known outside before: not "always sensitive")
        a.update({O.CKA_SENSITIVE: 1, O.CKA_EXTRACTABLE: 0,
                  O.CKA_ALWAYS_SENSITIVE: int(generated), O.CKA_NEVER_EXTRACTABLE: int(generated),
                  O.CKA_DECRYPT: 1, O.CKA_UNWRAP: 0})
        a[O.CKA_SIGN] = 1 if key_type == O.CKK_RSA else 0
        if cls == O.CKO_SECRET_KEY:
            a[O.CKA_ENCRYPT] = 1
    return a


def _int(tpl: dict[int, int | bytes], a: int) -> int | None:
    v = tpl.get(a)
    return int.from_bytes(v, "big") if isinstance(v, bytes) and v else None


def rsa_register(cls: int, tpl: dict[int, int | bytes], name: str | None,
                 masks: list[enums.CryptographicUsageMask]
                 ) -> tuple[Any, dict[int, int | bytes]]:
    """An imported RSA key as a KMIP managed object for Register, and the public
    attributes the gateway keeps (the private values go to the server, never to the
    identity map)."""
    n, e = _int(tpl, O.CKA_MODULUS), _int(tpl, O.CKA_PUBLIC_EXPONENT)
    if n is None or e is None:
        raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_MODULUS, CKA_PUBLIC_EXPONENT")
    bits = n.bit_length()
    if not RSA_BITS[0] <= bits <= RSA_BITS[1]:
        raise Pkcs11Error(ckr.KEY_SIZE_RANGE)
    if cls == O.CKO_PUBLIC_KEY:
        der = rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        mo = kobj.PublicKey(enums.CryptographicAlgorithm.RSA, bits, der,
                            enums.KeyFormatType.PKCS_1, masks=masks, name=name)
    else:
        d = _int(tpl, O.CKA_PRIVATE_EXPONENT)
        if d is None:
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_PRIVATE_EXPONENT")
        try:
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p),
                                            rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                            rsa.RSAPublicNumbers(e, n))
            der = numbers.private_key().private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
        except ValueError:
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "not an RSA key") from None
        mo = kobj.PrivateKey(enums.CryptographicAlgorithm.RSA, bits, der,
                             enums.KeyFormatType.PKCS_8, masks=masks, name=name)
    public: dict[int, int | bytes] = {
        O.CKA_MODULUS: n.to_bytes((bits + 7) // 8, "big"),
        O.CKA_PUBLIC_EXPONENT: e.to_bytes((e.bit_length() + 7) // 8, "big"),
        O.CKA_MODULUS_BITS: bits}
    return mo, public

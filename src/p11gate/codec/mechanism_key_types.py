"""Which key types each asymmetric mechanism works with (PKCS#11 2.40/3.0, §2.1–§2.3).

A module is not always built to be handed a key of another family: SoftHSM 2.6 starts
C_SignInit(CKM_RSA_X_509 or CKM_RSA_PKCS_PSS) with an AES, generic-secret or EC key and
crashes in the C_Sign that follows; with CKM_RSA_PKCS or CKM_ECDSA and a key of another
family it answers CKR_GENERAL_ERROR. The frontend checks a key's CKA_KEY_TYPE against
this table before any operation with these mechanisms starts. Mechanisms not listed are
left to the module (their modules check the key type themselves, or there is no family
to tell).
"""

from __future__ import annotations

from collections.abc import Callable

from . import constants as ck

#: CKK_EC_MONTGOMERY (PKCS#11 3.0; not in the 2.40 headers the constants come from)
CKK_EC_MONTGOMERY = 0x41

_NOT_USE = ("KEY_PAIR_GEN", "PARAMETER_GEN", "_G_GEN", "TPM_1_1")


def _family(match: Callable[[str], bool], key_types: frozenset[int]
            ) -> dict[int, frozenset[int]]:
    out: dict[int, frozenset[int]] = {}
    for name, value in vars(ck).items():
        if (name.startswith("CKM_") and isinstance(value, int) and match(name)
                and not any(part in name for part in _NOT_USE)):
            out[value] = key_types
    return out


def _rsa(name: str) -> bool:
    return name.startswith("CKM_RSA_") or name.endswith(
        ("_RSA_PKCS", "_RSA_PKCS_PSS", "_RSA_X9_31"))


#: mechanism type → the CKA_KEY_TYPE values a key used with it may have
KEY_TYPES: dict[int, frozenset[int]] = {
    **_family(_rsa, frozenset({ck.CKK_RSA})),
    **_family(lambda n: n == "CKM_DSA" or n.startswith("CKM_DSA_SHA"),
              frozenset({ck.CKK_DSA})),
    **_family(lambda n: n.startswith("CKM_ECDSA"), frozenset({ck.CKK_EC})),
    **_family(lambda n: n in ("CKM_ECDH1_DERIVE", "CKM_ECDH1_COFACTOR_DERIVE",
                              "CKM_ECMQV_DERIVE"),
              frozenset({ck.CKK_EC, CKK_EC_MONTGOMERY})),
    **_family(lambda n: n == "CKM_EDDSA", frozenset({ck.CKK_EC_EDWARDS})),
    **_family(lambda n: n == "CKM_DH_PKCS_DERIVE", frozenset({ck.CKK_DH})),
    **_family(lambda n: n == "CKM_X9_42_DH_DERIVE", frozenset({ck.CKK_X9_42_DH})),
}

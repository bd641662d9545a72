"""``[[backend]] max_key_bits``: the largest keys and domain parameters a client may
have a backend generate.

Key generation time grows steeply with size (RSA-8192 takes tens of seconds on a
software token, RSA-16384 many minutes, a 4096-bit DH safe prime longer still), and a
generation cannot be interrupted: it holds a module thread until it ends. Sizes beyond
these are refused by the gateway (``CKR_KEY_SIZE_RANGE``) before the backend sees them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KeyBitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: RSA modulus (CKA_MODULUS_BITS of C_GenerateKeyPair)
    rsa: int = Field(default=8192, ge=512, le=1 << 16)
    #: EC field size of the curve in CKA_EC_PARAMS (P-521 = 521)
    ec: int = Field(default=521, ge=160, le=1 << 14)
    #: DSA prime: of a key pair (CKA_PRIME) and of CKM_DSA_PARAMETER_GEN (CKA_PRIME_BITS)
    dsa: int = Field(default=3072, ge=512, le=1 << 16)
    #: DH prime of a key pair (CKA_PRIME of CKM_DH_PKCS_KEY_PAIR_GEN / X9.42)
    dh: int = Field(default=4096, ge=512, le=1 << 16)
    #: DH domain parameter generation (CKA_PRIME_BITS of CKM_DH_PKCS_PARAMETER_GEN /
    #: CKM_X9_42_DH_PARAMETER_GEN): a safe-prime search, by far the slowest generation
    dh_parameters: int = Field(default=2048, ge=512, le=1 << 16)
    #: secret keys (CKA_VALUE_LEN of C_GenerateKey, which is in bytes), bits
    secret: int = Field(default=8192, ge=64, le=1 << 20)

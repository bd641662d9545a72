"""Which deadline a backend call gets.

Most calls finish in milliseconds, and ``call_timeout`` catches a module that hangs.
Key and domain-parameter generation is slow by nature (an RSA-8192 key pair or a 2048-bit
DH safe prime can take minutes on a busy software token) yet legitimate, so it has its
own, longer ``keygen_timeout``: a missed deadline kills the worker and every session on
it, which must stay the answer to a hung module, not to a big key. How long a
generation may run is bounded by the key-size limits (``max_key_bits``), and how many
threads one identity's slow calls may hold by the fair share.

C_DeriveKey is not among them: derivation (ECDH, HKDF, …) costs what a signature costs.
"""

from __future__ import annotations

from ..codec.calls import CallId

#: calls that get ``keygen_timeout`` instead of ``call_timeout``
SLOW_CALLS = frozenset(CallId[n] for n in ("C_GenerateKey", "C_GenerateKeyPair"))


def deadline(call_id: int, call_timeout: float, keygen_timeout: float) -> float:
    return keygen_timeout if call_id in SLOW_CALLS else call_timeout

"""Plain Python values that the codec produces and consumes.

Mapping of signature codes to values:

=====  ====================================================================
y, u   ``int``
v      :class:`Version`
s, z   ``bytes`` (``s`` is fixed size, space padded; ``z`` has no NUL)
ay     ``bytes`` (present), :class:`Null` (absent flag + length), or ``None``
       (present flag + NULL array ``ffffffff``, the ≥ 0.25 way to write NULL/0)
au     ``list[int]`` (present) or :class:`Null` (absent flag + count)
fy/fu  ``int`` (capacity; 0 = size query, ``0xffffffff`` in ``fy`` = empty buffer)
aA     ``list[Attribute]``
fA     ``list[AttrRequest]``
M      :class:`Mechanism` or ``None`` (NULL mechanism pointer)
P      :class:`ParamUpdate`
=====  ====================================================================
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Version(NamedTuple):
    major: int
    minor: int


class Null(NamedTuple):
    """An absent output/input buffer: NULL pointer, with the length it stands for."""

    length: int


class Attribute(NamedTuple):
    """One CK_ATTRIBUTE as carried on the wire.

    ``length is None`` means the attribute was marked unavailable (validity byte 0,
    ulValueLen = CK_UNAVAILABLE_INFORMATION). Otherwise ``length`` is the sender's native
    ulValueLen and ``value`` the decoded value: ``int`` for BBOOL/ULONG, ``bytes | None``
    for byte arrays and dates (``None`` = NULL pointer), ``list[int] | None`` for mechanism
    arrays, ``list[Attribute] | None`` for nested templates.
    """

    type: int
    value: Any
    length: int | None


class AttrRequest(NamedTuple):
    """One entry of an ``fA`` request: the type and the caller's buffer size.

    ``nested`` is the caller's inner template for ATTRIBUTE_ARRAY types (new generation).
    """

    type: int
    length: int
    nested: list[AttrRequest] | None = None


class Mechanism(NamedTuple):
    """CK_MECHANISM. ``param`` is ``None`` (no parameter), raw ``bytes`` for mechanisms
    without a serializer, or one of the parameter tuples below."""

    type: int
    param: Any = None


class PssParams(NamedTuple):
    hash_alg: int
    mgf: int
    salt_len: int


class OaepParams(NamedTuple):
    hash_alg: int
    mgf: int
    source: int
    source_data: bytes | None


class Ecdh1Params(NamedTuple):
    kdf: int
    shared_data: bytes | None
    public_data: bytes | None


class IvParams(NamedTuple):
    iv: bytes | None


class CtrParams(NamedTuple):
    counter_bits: int
    cb: bytes | None


class GcmParams(NamedTuple):
    iv: bytes | None
    iv_bits: int
    aad: bytes | None
    tag_bits: int


class UlongParam(NamedTuple):
    """Parameters that are one CK_ULONG (MAC_GENERAL length, IBM_ECDSA_OTHER submechanism)."""

    value: int


class HandleParam(NamedTuple):
    """A parameter that is one object handle (IBM_ATTRIBUTEBOUND_WRAP)."""

    handle: int


class DhDeriveParams(NamedTuple):
    public_value: bytes | None


class BtcDeriveParams(NamedTuple):
    type: int
    child_key_index: int
    chain_code: bytes | None
    version: int


class KyberParams(NamedTuple):
    version: int
    mode: int
    kdf: int
    prepend: int
    cipher: bytes | None
    shared_data: bytes | None
    secret_handle: int


class ParamUpdate(NamedTuple):
    """``P`` in the C_DeriveKey2 reply (SPEC §4.5).

    ``present`` is None when the mechanism is parameterless (nothing on the wire).
    ``mode`` is set for IBM_KYBER; ``data`` carries the returned buffer (or Null(len)) for
    IBM_BTC_DERIVE and Kyber encapsulation.
    """

    present: bool | None
    mode: int | None = None
    data: bytes | Null | None = None

"""Marshalling between the codec's plain values and the C arguments of a PKCS#11 call:
request-side converters (``u`` → CK_ULONG, ``ay`` → pointer + length, ``M`` →
CK_MECHANISM*, ``aA`` → CK_ATTRIBUTE array, …), reply-side output pointers and their
finishers, and the mechanism parameter builders. Used by :mod:`.runs`, for
:class:`~.module.NativeModule`."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from ...codec import ckr
from ...codec.values import (
    BtcDeriveParams,
    CtrParams,
    DhDeriveParams,
    Ecdh1Params,
    GcmParams,
    HandleParam,
    IvParams,
    KyberParams,
    Null,
    OaepParams,
    PssParams,
    UlongParam,
    Version,
)
from ...errors import Pkcs11Error
from .cdef import ULONG_SIZE, ffi

if TYPE_CHECKING:
    from .module import NativeModule
    from .runs import _Spec

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
#: ``fy`` value meaning "non-NULL buffer of length 0" (SPEC §3.4)
EMPTY_BUFFER = 0xFFFFFFFF
#: nesting limit for attribute templates handed to the module
MAX_DEPTH = 8
#: at most this many entries in a nested template buffer of C_GetAttributeValue
MAX_NESTED = 1024
KYBER_ENCAPSULATE = 1

_NULL = ffi.NULL
_OK = ckr.OK
_TOO_SMALL = ckr.BUFFER_TOO_SMALL
_GET_ATTR_INBAND = frozenset(
    {ckr.OK, ckr.ATTRIBUTE_SENSITIVE, ckr.ATTRIBUTE_TYPE_INVALID, ckr.BUFFER_TOO_SMALL}
)
_BAD_VALUE = (TypeError, ValueError, OverflowError, AttributeError, IndexError, KeyError)

# One pending output: (finisher, a, b, c); finisher(rv, result, a, b, c) appends reply values.
_Out = tuple[Callable[[int, list[Any], Any, Any, Any], None], Any, Any, Any]
_Conv = Callable[["NativeModule", Any, list[Any], list[_Out], list[Any]], None]
_Tail = Callable[[list[Any], list[_Out]], None]
#: A call's run: a generator that marshals the arguments, yields the C argument list
#: once, is sent the CK_RV, and returns the reply values. The C call itself is made by
#: whoever drives it: NativeModule.call on the calling thread, or the in-process back end
#: on a native executor thread (backends/native/executor.py).
_Run = Generator[Sequence[Any], int, list[Any]]
_Runner = Callable[["NativeModule", "_Spec", Any, Sequence[Any]], _Run]


def _bad(detail: str) -> Pkcs11Error:
    return Pkcs11Error(ckr.ARGUMENTS_BAD, detail)


# ------------------------------------------------------------------ output finishers


def _fin_bytes(rv: int, result: list[Any], buf: Any, lenp: Any, alloc: int) -> None:
    n = lenp[0]
    if buf is None or rv:  # size query, or CKR_BUFFER_TOO_SMALL: the length as data
        result.append(Null(min(n, 0xFFFFFFFF)))
    else:
        result.append(ffi.buffer(buf, min(n, alloc))[:])


def _fin_ulongs(rv: int, result: list[Any], buf: Any, countp: Any, alloc: int) -> None:
    n = countp[0]
    if buf is None or rv:
        result.append(Null(min(n, 0xFFFFFFFF)))
    else:
        result.append(ffi.unpack(buf, min(n, alloc)))


def _fin_random(rv: int, result: list[Any], buf: Any, n: int, _c: Any) -> None:
    result.append(Null(0) if buf is None else ffi.buffer(buf, n)[:])


def _fin_ulong(rv: int, result: list[Any], p: Any, _b: Any, _c: Any) -> None:
    result.append(p[0])


def _fin_struct(rv: int, result: list[Any], p: Any, conv: Any, _c: Any) -> None:
    result.extend(conv(p))


def _version(v: Any) -> Version:
    return Version(v.major, v.minor)


def _chars(a: Any) -> bytes:
    return ffi.buffer(a)[:]


def _info(i: Any) -> list[Any]:
    return [
        _version(i.cryptokiVersion),
        _chars(i.manufacturerID),
        i.flags,
        _chars(i.libraryDescription),
        _version(i.libraryVersion),
    ]


def _slot_info(i: Any) -> list[Any]:
    return [
        _chars(i.slotDescription),
        _chars(i.manufacturerID),
        i.flags,
        _version(i.hardwareVersion),
        _version(i.firmwareVersion),
    ]


def _token_info(i: Any) -> list[Any]:
    return [
        _chars(i.label),
        _chars(i.manufacturerID),
        _chars(i.model),
        _chars(i.serialNumber),
        i.flags,
        i.ulMaxSessionCount,
        i.ulSessionCount,
        i.ulMaxRwSessionCount,
        i.ulRwSessionCount,
        i.ulMaxPinLen,
        i.ulMinPinLen,
        i.ulTotalPublicMemory,
        i.ulFreePublicMemory,
        i.ulTotalPrivateMemory,
        i.ulFreePrivateMemory,
        _version(i.hardwareVersion),
        _version(i.firmwareVersion),
        _chars(i.utcTime),
    ]


def _session_info(i: Any) -> list[Any]:
    return [i.slotID, i.state, i.flags, i.ulDeviceError]


def _mechanism_info(i: Any) -> list[Any]:
    return [i.ulMinKeySize, i.ulMaxKeySize, i.flags]


# ------------------------------------------------------------------ reply-side outputs


def _tail_ulong(cargs: list[Any], outs: list[_Out]) -> None:
    p = ffi.new("CK_ULONG *")
    cargs.append(p)
    outs.append((_fin_ulong, p, None, None))


def _tail_null(cargs: list[Any], outs: list[_Out]) -> None:
    cargs.append(_NULL)


def _tail_struct(ctype: str, conv: Callable[[Any], list[Any]]) -> _Tail:
    def tail(cargs: list[Any], outs: list[_Out]) -> None:
        p = ffi.new(ctype)
        cargs.append(p)
        outs.append((_fin_struct, p, conv, None))

    return tail


_REPLY_TAILS: dict[str, tuple[_Tail, ...]] = {
    "": (),
    "ay": (),
    "au": (),
    "u": (_tail_ulong,),
    "uu": (_tail_ulong, _tail_ulong),
    "vsusv": (_tail_struct("CK_INFO *", _info),),
    "ssuvv": (_tail_struct("CK_SLOT_INFO *", _slot_info),),
    "ssssuuuuuuuuuuuvvs": (_tail_struct("CK_TOKEN_INFO *", _token_info),),
    "uuuu": (_tail_struct("CK_SESSION_INFO *", _session_info),),
    "uuu": (_tail_struct("CK_MECHANISM_INFO *", _mechanism_info),),
}

# ------------------------------------------------------------------ request-side converters


def _in_ulong(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    if v.__class__ is not int:
        raise _bad("CK_ULONG argument must be an int")
    cargs.append(v)


def _in_bytes(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    if v.__class__ is bytes:
        cargs.append(v)
        cargs.append(len(v))
    elif v is None:
        cargs.append(_NULL)
        cargs.append(0)
    elif isinstance(v, Null):
        # NULL with a non-zero length: a module would dereference NULL; p11-kit's own
        # client refuses to send it (SPEC §3.4).
        if v.length:
            raise _bad("NULL input buffer with a non-zero length")
        cargs.append(_NULL)
        cargs.append(0)
    elif isinstance(v, bytearray | memoryview):
        b = bytes(v)
        cargs.append(b)
        cargs.append(len(b))
    else:
        raise _bad("byte array argument must be bytes")


def _in_label(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    # C_InitToken reads exactly 32 bytes of label: pad the `z`/`s` value to 32 with spaces.
    if v is None:
        v = b""
    if not isinstance(v, bytes | bytearray):
        raise _bad("label must be bytes")
    cargs.append(bytes(v[:32]).ljust(32, b" ") + b"\0")


def _in_mechanism(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    cargs.append(mod._mechanism(v, keep, None))


def _in_template(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    arr, n = mod._template(v, keep, 0)
    cargs.append(arr)
    cargs.append(n)


def _capacity(v: Any) -> int:
    if v.__class__ is not int or v < 0:
        raise _bad("buffer capacity must be a non-negative int")
    return v


def _in_out_bytes(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    cap = _capacity(v)
    lenp = ffi.new("CK_ULONG *")
    if cap == 0:  # size query: NULL buffer
        cargs.append(_NULL)
        cargs.append(lenp)
        outs.append((_fin_bytes, None, lenp, 0))
        return
    if cap == EMPTY_BUFFER:  # non-NULL buffer of length 0: 1-byte dummy
        buf = ffi.new("CK_BYTE[1]")
        cap = 1
    else:
        cap = min(cap, mod.max_buffer)
        buf = ffi.new("CK_BYTE[]", cap)
        lenp[0] = cap
    cargs.append(buf)
    cargs.append(lenp)
    outs.append((_fin_bytes, buf, lenp, cap))


def _in_out_ulongs(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    cap = _capacity(v)
    countp = ffi.new("CK_ULONG *")
    if cap == 0:
        cargs.append(_NULL)
        cargs.append(countp)
        outs.append((_fin_ulongs, None, countp, 0))
        return
    cap = min(cap, mod.max_buffer // ULONG_SIZE)
    buf = ffi.new("CK_ULONG[]", cap)
    countp[0] = cap
    cargs.append(buf)
    cargs.append(countp)
    outs.append((_fin_ulongs, buf, countp, cap))


def _in_find_buffer(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    # C_FindObjects(hSession, phObject, ulMaxObjectCount, pulObjectCount)
    cap = min(_capacity(v), mod.max_buffer // ULONG_SIZE)
    countp = ffi.new("CK_ULONG *")
    if cap == 0:
        cargs.append(_NULL)
        cargs.append(0)
        cargs.append(countp)
        outs.append((_fin_ulongs, None, countp, 0))
        return
    buf = ffi.new("CK_OBJECT_HANDLE[]", cap)
    cargs.append(buf)
    cargs.append(cap)
    cargs.append(countp)
    outs.append((_fin_ulongs, buf, countp, cap))


def _in_random_buffer(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    # C_GenerateRandom(hSession, RandomData, ulRandomLen): the length is an input.
    cap = _capacity(v)
    if cap == 0:
        cargs.append(_NULL)
        cargs.append(0)
        outs.append((_fin_random, None, 0, None))
        return
    if cap == EMPTY_BUFFER:
        buf = ffi.new("CK_BYTE[1]")
        cargs.append(buf)
        cargs.append(0)
        outs.append((_fin_random, buf, 0, None))
        return
    cap = min(cap, mod.max_buffer)
    buf = ffi.new("CK_BYTE[]", cap)
    cargs.append(buf)
    cargs.append(cap)
    outs.append((_fin_random, buf, cap, None))


def _in_byte(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:
    if v.__class__ is not int:
        raise _bad("CK_BYTE argument must be an int")
    cargs.append(v)


def _in_special(
    mod: NativeModule, v: Any, cargs: list[Any], outs: list[_Out], keep: list[Any]
) -> None:  # pragma: no cover - codes only used by calls with their own run function
    raise _bad("argument handled by the call's own code")


_REQUEST_CONVERTERS: dict[str, _Conv] = {
    "u": _in_ulong,
    "y": _in_byte,
    "ay": _in_bytes,
    "z": _in_label,
    "s": _in_label,
    "M": _in_mechanism,
    "aA": _in_template,
    "fy": _in_out_bytes,
    "fu": _in_out_ulongs,
    "fA": _in_special,
}
_BUFFER_CONVERTERS = (_in_out_bytes, _in_out_ulongs, _in_find_buffer, _in_random_buffer)

# ------------------------------------------------------------------ mechanism parameters


def _copy(data: bytes | bytearray | None, keep: list[Any]) -> tuple[Any, int]:
    """A writable C copy of ``data`` (modules may write into parameters)."""
    if data is None:
        return _NULL, 0
    if not isinstance(data, bytes | bytearray):
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "parameter field must be bytes")
    buf = ffi.new("CK_BYTE[]", len(data) or 1)
    ffi.memmove(buf, data, len(data))
    keep.append(buf)
    return buf, len(data)


_ParamBuilder = Callable[[Any, list[Any], "dict[str, Any] | None"], tuple[Any, int]]


def _p_raw(p: Any, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    return _copy(p, keep)


def _p_iv(p: IvParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    return _copy(p.iv, keep)


def _p_dh(p: DhDeriveParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    return _copy(p.public_value, keep)


def _p_pss(p: PssParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_RSA_PKCS_PSS_PARAMS *", (p.hash_alg, p.mgf, p.salt_len))
    return s, ffi.sizeof("CK_RSA_PKCS_PSS_PARAMS")


def _p_oaep(p: OaepParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_RSA_PKCS_OAEP_PARAMS *")
    s.hashAlg = p.hash_alg
    s.mgf = p.mgf
    s.source = p.source
    s.pSourceData, s.ulSourceDataLen = _copy(p.source_data, keep)
    return s, ffi.sizeof("CK_RSA_PKCS_OAEP_PARAMS")


def _p_ecdh1(p: Ecdh1Params, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_ECDH1_DERIVE_PARAMS *")
    s.kdf = p.kdf
    s.pSharedData, s.ulSharedDataLen = _copy(p.shared_data, keep)
    s.pPublicData, s.ulPublicDataLen = _copy(p.public_data, keep)
    return s, ffi.sizeof("CK_ECDH1_DERIVE_PARAMS")


def _p_ctr(p: CtrParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    if not isinstance(p.cb, bytes | bytearray) or len(p.cb) != 16:
        raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, "CTR counter block must be 16 bytes")
    s = ffi.new("CK_AES_CTR_PARAMS *")
    s.ulCounterBits = p.counter_bits
    ffi.memmove(s.cb, bytes(p.cb), 16)
    return s, ffi.sizeof("CK_AES_CTR_PARAMS")


def _p_gcm(p: GcmParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_GCM_PARAMS *")
    s.pIv, s.ulIvLen = _copy(p.iv, keep)
    s.ulIvBits = p.iv_bits
    s.pAAD, s.ulAADLen = _copy(p.aad, keep)
    s.ulTagBits = p.tag_bits
    return s, ffi.sizeof("CK_GCM_PARAMS")


def _p_ulong(
    p: UlongParam | HandleParam, keep: list[Any], extra: dict[str, Any] | None
) -> tuple[Any, int]:
    return ffi.new("CK_ULONG *", p[0]), ULONG_SIZE


def _p_btc(p: BtcDeriveParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_IBM_BTC_DERIVE_PARAMS *")
    s.type = p.type
    s.childKeyIndex = p.child_key_index
    s.pChainCode, s.ulChainCodeLen = _copy(p.chain_code, keep)
    s.version = p.version
    if extra is not None:
        extra["out"] = (s.pChainCode, s.ulChainCodeLen)
    return s, ffi.sizeof("CK_IBM_BTC_DERIVE_PARAMS")


def _p_kyber(p: KyberParams, keep: list[Any], extra: dict[str, Any] | None) -> tuple[Any, int]:
    s = ffi.new("CK_IBM_KYBER_PARAMS *")
    s.ulVersion = p.version
    s.mode = p.mode
    s.kdf = p.kdf
    s.bPrepend = p.prepend
    s.pCipher, s.ulCipherLen = _copy(p.cipher, keep)
    s.pSharedData, s.ulSharedDataLen = _copy(p.shared_data, keep)
    s.hSecret = p.secret_handle
    if extra is not None:
        extra["out"] = (s.pCipher, s.ulCipherLen)
    return s, ffi.sizeof("CK_IBM_KYBER_PARAMS")


_PARAM_BUILDERS: dict[type, _ParamBuilder] = {
    bytes: _p_raw,
    bytearray: _p_raw,
    IvParams: _p_iv,
    DhDeriveParams: _p_dh,
    PssParams: _p_pss,
    OaepParams: _p_oaep,
    Ecdh1Params: _p_ecdh1,
    CtrParams: _p_ctr,
    GcmParams: _p_gcm,
    UlongParam: _p_ulong,
    HandleParam: _p_ulong,
    BtcDeriveParams: _p_btc,
    KyberParams: _p_kyber,
}


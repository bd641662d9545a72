"""One PKCS#11 module loaded with cffi (ABI mode), called with the codec's plain values.

:meth:`NativeModule.call` takes the arguments of an RPC *request* (``codec.calls``) and
returns the values of the RPC *reply*, following the conventions of
:mod:`p11gate.backends.base`. It is table driven: each call's request signature decides
the C argument list (``u`` → CK_ULONG, ``ay`` → pointer + length, ``fy`` → output buffer +
length pointer, ``M`` → CK_MECHANISM*, ``aA`` → CK_ATTRIBUTE array + count, …), and its
reply signature adds the trailing output pointers (``u`` → CK_ULONG*, ``vsusv`` →
CK_INFO*, …). Only C_GetAttributeValue, C_SignMessageNext and C_DeriveKey2 — and the
argument quirks of C_OpenSession, C_WaitForSlotEvent, C_FindObjects and
C_GenerateRandom — need their own code.

The calls are synchronous and thread safe (the module is initialized with
CKF_OS_LOCKING_OK); cffi releases the GIL for the duration of each C call, so several
threads may call at once. Memory handed to the module is allocated here, sized from the
request but clamped to ``max_buffer``; nothing the module writes is read beyond what was
allocated, and pointers the module writes are never dereferenced. Malformed values raise
:class:`~p11gate.errors.Pkcs11Error` (CKR_ARGUMENTS_BAD), never crash the process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, cast

from ...codec import ckr
from ...codec.calls import CALLS
from ...codec.mechanisms import CKM_IBM_BTC_DERIVE, CKM_IBM_KYBER
from ...codec.param_kinds import (
    MESSAGE_PARAMETER_CALLS,
    message_parameter_refusal,
    raw_parameter_refusal,
)
from ...codec.tables import V026, AttrClass, Dialect
from ...codec.values import (
    Attribute,
    AttrRequest,
    BtcDeriveParams,
    CtrParams,
    DhDeriveParams,
    Ecdh1Params,
    GcmParams,
    HandleParam,
    IvParams,
    KyberParams,
    Mechanism,
    Null,
    OaepParams,
    ParamUpdate,
    PssParams,
    UlongParam,
    Version,
)
from ...errors import Pkcs11Error
from .cdef import ATTRIBUTE_SIZE, CKF_OS_LOCKING_OK, ULONG_SIZE, UNAVAILABLE, ffi

__all__ = ["DEFAULT_MAX_BUFFER", "NativeModule"]

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

# ------------------------------------------------------------------ call table


class _Spec:
    """How one call id maps onto its C function."""

    __slots__ = ("buffered", "c_name", "convs", "id", "nargs", "run", "tails")

    def __init__(
        self,
        call_id: int,
        c_name: str,
        convs: tuple[_Conv, ...],
        tails: tuple[_Tail, ...],
        run: _Runner,
    ) -> None:
        self.id = call_id
        self.c_name = c_name
        self.convs = convs
        self.nargs = len(convs)
        self.tails = tails
        self.buffered = any(c in _BUFFER_CONVERTERS for c in convs)
        self.run = run


def _run_generic(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) != spec.nargs:
        raise _bad(f"{spec.c_name} takes {spec.nargs} arguments")
    cargs: list[Any] = []
    outs: list[_Out] = []
    keep: list[Any] = []
    for conv, v in zip(spec.convs, args, strict=True):
        conv(mod, v, cargs, outs, keep)
    for tail in spec.tails:
        tail(cargs, outs)
    rv = yield cargs
    if rv != _OK and (rv != _TOO_SMALL or not spec.buffered):
        raise Pkcs11Error(rv)
    result: list[Any] = []
    for fin, a, b, c in outs:
        fin(rv, result, a, b, c)
    return result


def _run_get_attribute_value(
    mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]
) -> _Run:
    if len(args) != 3:
        raise _bad("C_GetAttributeValue takes 3 arguments")
    session, obj, reqs = args
    if session.__class__ is not int or obj.__class__ is not int:
        raise _bad("handles must be ints")
    keep: list[Any] = []
    budget = [mod.max_buffer * 4]
    arr, layout = mod._get_template(reqs, keep, budget, 0)
    rv = yield (session, obj, arr, len(layout))
    if rv not in _GET_ATTR_INBAND:
        raise Pkcs11Error(rv)
    return [mod._decode_template(arr, len(layout), layout), rv]


def _run_sign_message_next(
    mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]
) -> _Run:
    # uayayyfy: the y says whether the application passed pulSignatureLen (final part).
    if len(args) != 5:
        raise _bad("C_SignMessageNext takes 5 arguments")
    session, param, data, want_sig, cap = args
    cargs: list[Any] = []
    outs: list[_Out] = []
    keep: list[Any] = []
    _in_ulong(mod, session, cargs, outs, keep)
    _in_bytes(mod, param, cargs, outs, keep)
    _in_bytes(mod, data, cargs, outs, keep)
    if want_sig:
        _in_out_bytes(mod, cap, cargs, outs, keep)
    else:
        cargs.append(_NULL)
        cargs.append(_NULL)
    rv = yield cargs
    if rv != _OK and (rv != _TOO_SMALL or not want_sig):
        raise Pkcs11Error(rv)
    if not want_sig:
        return [Null(0)]
    result: list[Any] = []
    for fin, a, b, c in outs:
        fin(rv, result, a, b, c)
    return result


def _run_derive_key2(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    # uMuaA → uPu: the CK_RV in band, the updated parameter, the handle only on CKR_OK.
    if len(args) != 4:
        raise _bad("C_DeriveKey2 takes 4 arguments")
    session, m, base, template = args
    if session.__class__ is not int or base.__class__ is not int:
        raise _bad("handles must be ints")
    keep: list[Any] = []
    extra: dict[str, Any] = {}
    mech = mod._mechanism(m, keep, extra)
    arr, n = mod._template(template, keep, 0)
    hp = ffi.new("CK_OBJECT_HANDLE *")
    rv = yield (session, mech, base, arr, n, hp)
    if rv != _OK and rv != _TOO_SMALL:
        raise Pkcs11Error(rv)
    update = mod._param_update(m, mech, extra)
    return [rv, update, hp[0]] if rv == _OK else [rv, update]


# Fast paths for the commonest shapes (the hot path: Sign, Encrypt, Digest, GenerateRandom,
# *Init, *Final). They handle the ordinary values and fall back to _run_generic for
# anything else (NULL buffers, size queries, odd types), which then decides.


def _run_u_ay_fy(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) == 3:
        session, data, cap = args
        if (
            session.__class__ is int
            and data.__class__ is bytes
            and cap.__class__ is int
            and 0 < cap < EMPTY_BUFFER
        ):
            if cap > mod.max_buffer:
                cap = mod.max_buffer
            buf = ffi.new("CK_BYTE[]", cap)
            lenp = ffi.new("CK_ULONG *", cap)
            rv = yield (session, data, len(data), buf, lenp)
            if rv == _OK:
                n = lenp[0]
                return [ffi.buffer(buf, n if n < cap else cap)[:]]
            if rv == _TOO_SMALL:
                return [Null(min(lenp[0], 0xFFFFFFFF))]
            raise Pkcs11Error(rv)
    return (yield from _run_generic(mod, spec, fn, args))


def _run_u_fy(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) == 2:
        session, cap = args
        if session.__class__ is int and cap.__class__ is int and 0 < cap < EMPTY_BUFFER:
            if cap > mod.max_buffer:
                cap = mod.max_buffer
            buf = ffi.new("CK_BYTE[]", cap)
            lenp = ffi.new("CK_ULONG *", cap)
            rv = yield (session, buf, lenp)
            if rv == _OK:
                n = lenp[0]
                return [ffi.buffer(buf, n if n < cap else cap)[:]]
            if rv == _TOO_SMALL:
                return [Null(min(lenp[0], 0xFFFFFFFF))]
            raise Pkcs11Error(rv)
    return (yield from _run_generic(mod, spec, fn, args))


def _run_random(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) == 2:
        session, cap = args
        if session.__class__ is int and cap.__class__ is int and 0 < cap < EMPTY_BUFFER:
            if cap > mod.max_buffer:
                cap = mod.max_buffer
            buf = ffi.new("CK_BYTE[]", cap)
            rv = yield (session, buf, cap)
            if rv != _OK:
                raise Pkcs11Error(rv)
            return [ffi.buffer(buf, cap)[:]]
    return (yield from _run_generic(mod, spec, fn, args))


def _run_u_m_u(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) == 3:
        session, m, key = args
        if session.__class__ is int and key.__class__ is int:
            keep: list[Any] = []
            rv = yield (session, mod._mechanism(m, keep, None), key)
            if rv != _OK:
                raise Pkcs11Error(rv)
            return []
    return (yield from _run_generic(mod, spec, fn, args))


def _run_u(mod: NativeModule, spec: _Spec, fn: Any, args: Sequence[Any]) -> _Run:
    if len(args) == 1 and args[0].__class__ is int:
        rv = yield (args[0],)
        if rv != _OK:
            raise Pkcs11Error(rv)
        return []
    return (yield from _run_generic(mod, spec, fn, args))


_FAST_RUNS: dict[tuple[_Conv, ...], _Runner] = {
    (_in_ulong, _in_bytes, _in_out_bytes): _run_u_ay_fy,
    (_in_ulong, _in_out_bytes): _run_u_fy,
    (_in_ulong, _in_random_buffer): _run_random,
    (_in_ulong, _in_mechanism, _in_ulong): _run_u_m_u,
    (_in_ulong,): _run_u,
}

_C_NAMES = {88: "C_InitToken", 89: "C_DeriveKey"}
_CONV_OVERRIDES: dict[tuple[int, int], _Conv] = {
    (27, 1): _in_find_buffer,  # C_FindObjects
    (64, 1): _in_random_buffer,  # C_GenerateRandom
}
_TAIL_OVERRIDES: dict[int, tuple[_Tail, ...]] = {
    10: (_tail_null, _tail_null, _tail_ulong),  # C_OpenSession: pApplication, Notify
    65: (_tail_ulong, _tail_null),  # C_WaitForSlotEvent: pReserved
}
_SPECIAL_RUNS = {
    24: _run_get_attribute_value,
    81: _run_sign_message_next,
    89: _run_derive_key2,
}


def _build_specs() -> list[_Spec | None]:
    specs: list[_Spec | None] = [None] * len(CALLS)
    for call in CALLS:
        if call.id < 3:  # ERROR, C_Initialize, C_Finalize: not calls for call()
            continue
        convs = tuple(
            _CONV_OVERRIDES.get((call.id, i), _REQUEST_CONVERTERS[code])
            for i, code in enumerate(call.req_codes)
        )
        tails = _TAIL_OVERRIDES.get(call.id)
        if tails is None:
            tails = _REPLY_TAILS.get(call.reply, ())
        run = _SPECIAL_RUNS.get(call.id) or (not tails and _FAST_RUNS.get(convs)) or _run_generic
        specs[call.id] = _Spec(call.id, _C_NAMES.get(call.id, call.name), convs, tails, run)
    return specs


_SPECS = _build_specs()


# ------------------------------------------------------------------ the module


class NativeModule:
    """A PKCS#11 module (.so) loaded in this process.

    ``NativeModule(path)`` loads the library and its function list (``C_GetInterface``
    for a PKCS#11 3.x interface when the module has one, else ``C_GetFunctionList``);
    :meth:`initialize` and :meth:`finalize` wrap C_Initialize/C_Finalize; :meth:`call`
    performs any other call by RPC call id. ``dialect`` only selects the attribute
    value-type table used to decode C_GetAttributeValue results (default: p11-kit 0.26).
    """

    def __init__(
        self,
        path: str,
        init_reserved: str | bytes | None = None,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        dialect: Dialect = V026,
        raw_parameter_mechanisms: Iterable[int] = (),
    ) -> None:
        self.path = path
        #: vendor mechanisms whose raw parameter bytes the operator lets through
        self.raw_parameter_mechanisms = frozenset(raw_parameter_mechanisms)
        self.max_buffer = max(1, int(max_buffer))
        self._init_reserved = (
            init_reserved.encode() if isinstance(init_reserved, str) else init_reserved
        )
        self._reserved_buf: Any = None
        self._attr_classes = dialect.attr_classes
        self._noparam = dialect.noparam
        self.initialized = False
        #: True when C_Initialize answered CKR_CRYPTOKI_ALREADY_INITIALIZED (someone
        #: else in this process owns the module; finalize() then leaves it alone)
        self.shared = False
        try:
            self._lib = ffi.dlopen(path)
        except OSError as e:
            raise OSError(f"cannot load PKCS#11 module {path!r}: {e}") from None
        self._functions, self.interface_version = self._function_list()
        self._fns: list[Any] = [None] * len(CALLS)
        for spec in _SPECS:
            if spec is None:
                continue
            fp = getattr(self._functions, spec.c_name, None)
            if fp is not None and fp != _NULL:
                self._fns[spec.id] = fp

    def _function_list(self) -> tuple[Any, Version]:
        lib = self._lib
        try:
            get_interface = lib.C_GetInterface
        except AttributeError:
            get_interface = None
        if get_interface is not None:
            pp = ffi.new("CK_INTERFACE_PTR *")
            version = ffi.new("CK_VERSION *", (3, 0))
            rv = get_interface(b"PKCS 11", version, pp, 0)
            if rv != _OK:  # no 3.0 interface by that version: take the default one
                rv = get_interface(_NULL, _NULL, pp, 0)
            if rv == _OK and pp[0] != _NULL and pp[0].pFunctionList != _NULL:
                fl = ffi.cast("CK_FUNCTION_LIST_3_0 *", pp[0].pFunctionList)
                if fl.version.major >= 3:
                    return fl, Version(fl.version.major, fl.version.minor)
        try:
            get_function_list = lib.C_GetFunctionList
        except AttributeError:
            raise OSError(f"{self.path!r} is not a PKCS#11 module (no C_GetFunctionList)") from None
        ppfl = ffi.new("CK_FUNCTION_LIST_PTR *")
        rv = get_function_list(ppfl)
        if rv != _OK:
            raise Pkcs11Error(rv, "C_GetFunctionList")
        if ppfl[0] == _NULL:
            raise Pkcs11Error(ckr.GENERAL_ERROR, "C_GetFunctionList returned NULL")
        fl = ppfl[0]
        return fl, Version(fl.version.major, fl.version.minor)

    # -------------------------------------------------------------- lifecycle

    def set_dialect(self, dialect: Dialect) -> None:
        """Use ``dialect``'s attribute value-type table (and parameterless mechanism list)
        from now on: the one of the RPC peer the results go to."""
        self._attr_classes = dialect.attr_classes
        self._noparam = dialect.noparam

    def initialize(self, init_reserved: str | bytes | None = None) -> None:
        """C_Initialize with CKF_OS_LOCKING_OK and pReserved = the NUL-terminated
        ``init_reserved`` (this argument, else the constructor's, else NULL)."""
        reserved = init_reserved if init_reserved is not None else self._init_reserved
        if isinstance(reserved, str):
            reserved = reserved.encode()
        args = ffi.new("CK_C_INITIALIZE_ARGS *")
        args.flags = CKF_OS_LOCKING_OK
        if reserved is not None:
            # kept for the module's lifetime: a module may hold on to the pointer
            self._reserved_buf = ffi.new("char[]", reserved)
            args.pReserved = self._reserved_buf
        rv = self._functions.C_Initialize(args)
        if rv == ckr.CRYPTOKI_ALREADY_INITIALIZED:
            self.shared = True
        elif rv != _OK:
            raise Pkcs11Error(rv, f"C_Initialize of {self.path}")
        self.initialized = True

    def finalize(self) -> None:
        """C_Finalize (unless the module was already initialized by someone else)."""
        if not self.initialized:
            return
        self.initialized = False
        if self.shared:
            return
        rv = self._functions.C_Finalize(_NULL)
        if rv != _OK and rv != ckr.CRYPTOKI_NOT_INITIALIZED:
            raise Pkcs11Error(rv, "C_Finalize")

    def supports(self, call_id: int) -> bool:
        """Whether the module provides the C function behind ``call_id``."""
        return 0 <= call_id < len(self._fns) and self._fns[call_id] is not None

    # -------------------------------------------------------------- calls

    def call(self, call_id: int, args: Sequence[Any]) -> list[Any]:
        """Perform RPC call ``call_id`` (3…89) with the request's ``args``; return the
        reply values (see :mod:`p11gate.backends.base`). Raises Pkcs11Error."""
        run, fn, cargs = self.begin(call_id, args)
        try:
            rv = fn(*cargs)
        except _BAD_VALUE as e:  # a value cffi cannot convert to the C type
            run.close()
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, f"{self._c_name(call_id)}: {e}") from None
        return self.finish(call_id, run, rv)

    def begin(self, call_id: int, args: Sequence[Any]) -> tuple[_Run, Any, Sequence[Any]]:
        """The first half of :meth:`call`: check and marshal the arguments. Returns the
        call's run (hand its CK_RV to :meth:`finish`), the C function, and its C
        arguments; the run keeps every buffer they point at alive until it is finished
        or closed. Raises Pkcs11Error, as :meth:`call` does."""
        try:
            spec = _SPECS[call_id] if call_id >= 0 else None
        except (IndexError, TypeError):
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, f"call id {call_id!r}") from None
        if spec is None:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, f"call id {call_id} is not a call")
        if call_id in MESSAGE_PARAMETER_CALLS and len(args) > 1:
            why = message_parameter_refusal(args[1])  # defence in depth, as for mechanisms
            if why is not None:
                raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, why)
        fn = self._fns[call_id]
        if fn is None:
            raise Pkcs11Error(ckr.FUNCTION_NOT_SUPPORTED, spec.c_name)
        run = spec.run(self, spec, fn, args)
        try:
            return run, fn, next(run)
        except StopIteration:  # every run makes its one C call
            raise Pkcs11Error(ckr.GENERAL_ERROR, f"{spec.c_name}: no call") from None
        except Pkcs11Error:
            raise
        except _BAD_VALUE as e:
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, f"{spec.c_name}: {e}") from None
        except MemoryError:
            raise Pkcs11Error(ckr.DEVICE_MEMORY, spec.c_name) from None

    def finish(self, call_id: int, run: _Run, rv: int) -> list[Any]:
        """The second half of :meth:`call`: the reply values for the C call's CK_RV."""
        try:
            run.send(rv)
        except StopIteration as done:
            return cast(list[Any], done.value)
        except Pkcs11Error:
            raise
        except _BAD_VALUE as e:
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, f"{self._c_name(call_id)}: {e}") from None
        except MemoryError:
            raise Pkcs11Error(ckr.DEVICE_MEMORY, self._c_name(call_id)) from None
        run.close()
        raise Pkcs11Error(ckr.GENERAL_ERROR, f"{self._c_name(call_id)}: a second call")

    @staticmethod
    def _c_name(call_id: int) -> str:
        spec = _SPECS[call_id]
        return spec.c_name if spec is not None else str(call_id)

    def function(self, call_id: int) -> Any:
        """The module's C function behind ``call_id`` (a cffi function pointer), or
        None."""
        return self._fns[call_id] if 0 <= call_id < len(self._fns) else None

    # -------------------------------------------------------------- helpers

    def _attr_class(self, atype: int) -> AttrClass:
        return self._attr_classes.get(atype, AttrClass.BYTE_ARRAY)

    def _mechanism(self, m: Any, keep: list[Any], extra: dict[str, Any] | None) -> Any:
        if m is None:
            return _NULL
        if not isinstance(m, Mechanism):
            m = Mechanism(*m)
        mech = ffi.new("CK_MECHANISM *")
        mech.mechanism = m.type
        param = m.param
        if isinstance(param, bytes | bytearray):
            # defence in depth: raw bytes only for a parameter without pointers
            why = raw_parameter_refusal(m.type, len(param), self.raw_parameter_mechanisms)
            if why is not None:
                raise Pkcs11Error(ckr.MECHANISM_PARAM_INVALID, why)
            if not param:
                return mech  # an empty parameter is a NULL one
        if param is not None:
            builder = _PARAM_BUILDERS.get(param.__class__)
            if builder is None:
                raise Pkcs11Error(
                    ckr.MECHANISM_PARAM_INVALID, f"unsupported parameter {type(param).__name__}"
                )
            p, size = builder(param, keep, extra)
            keep.append(p)
            mech.pParameter = p
            mech.ulParameterLen = size
        return mech

    def _param_update(self, m: Any, mech: Any, extra: dict[str, Any]) -> ParamUpdate:
        if m is None:
            return ParamUpdate(False)
        mtype = m[0]
        if mtype in self._noparam:
            return ParamUpdate(None)
        if mech.pParameter == _NULL or not mech.ulParameterLen:
            return ParamUpdate(False)
        if mtype == CKM_IBM_BTC_DERIVE and isinstance(m[1], BtcDeriveParams):
            s = ffi.cast("CK_IBM_BTC_DERIVE_PARAMS *", mech.pParameter)
            return ParamUpdate(True, None, self._out_field(s.pChainCode, s.ulChainCodeLen, extra))
        if mtype == CKM_IBM_KYBER and isinstance(m[1], KyberParams):
            s = ffi.cast("CK_IBM_KYBER_PARAMS *", mech.pParameter)
            mode = int(s.mode)
            if mode == KYBER_ENCAPSULATE:
                return ParamUpdate(True, mode, self._out_field(s.pCipher, s.ulCipherLen, extra))
            return ParamUpdate(True, mode)
        return ParamUpdate(True)

    @staticmethod
    def _out_field(ptr: Any, length: int, extra: dict[str, Any]) -> bytes | Null:
        """An output buffer inside a parameter: read only our own allocation."""
        ours, alloc = extra.get("out", (_NULL, 0))
        if ptr == _NULL or ours == _NULL or ptr != ours:
            return Null(min(length, 0xFFFFFFFF))
        return ffi.buffer(ours, min(length, alloc))[:]

    def _template(self, attrs: Any, keep: list[Any], depth: int) -> tuple[Any, int]:
        """CK_ATTRIBUTE array (and its values) from codec Attribute values."""
        if depth > MAX_DEPTH:
            raise _bad("attribute templates nested too deeply")
        if attrs is None:
            attrs = ()
        n = len(attrs)
        arr = ffi.new("CK_ATTRIBUTE[]", n or 1)
        keep.append(arr)
        for i in range(n):
            atype, value, length = attrs[i]
            ca = arr[i]
            ca.type = atype
            if length is None:  # unavailable: NULL, (CK_ULONG)-1
                ca.ulValueLen = UNAVAILABLE
                continue
            if value is None or isinstance(value, Null):
                continue  # NULL pointer, length 0
            cls = value.__class__
            if cls is bytes or cls is bytearray:
                buf = ffi.from_buffer(value)
                keep.append(buf)
                ca.pValue = buf
                ca.ulValueLen = len(value)
            elif cls is int or cls is bool:
                if self._attr_classes.get(atype) is AttrClass.BYTE:
                    p = ffi.new("CK_BBOOL *", value)
                    ca.ulValueLen = 1
                else:
                    p = ffi.new("CK_ULONG *", value)
                    ca.ulValueLen = ULONG_SIZE
                keep.append(p)
                ca.pValue = p
            elif cls is list or cls is tuple:
                if self._attr_class(atype) is AttrClass.ATTRIBUTE_ARRAY or (
                    value and isinstance(value[0], tuple)
                ):
                    sub, m = self._template(value, keep, depth + 1)
                    ca.pValue = sub
                    ca.ulValueLen = m * ATTRIBUTE_SIZE
                else:
                    p = ffi.new("CK_ULONG[]", list(value) or [0])
                    keep.append(p)
                    ca.pValue = p
                    ca.ulValueLen = len(value) * ULONG_SIZE
            else:
                raise _bad(f"attribute {atype:#x}: unsupported value {cls.__name__}")
        return arr, n

    def _get_template(
        self, reqs: Any, keep: list[Any], budget: list[int], depth: int
    ) -> tuple[Any, list[Any]]:
        """CK_ATTRIBUTE array with a buffer of the requested size for each entry (length 0
        → NULL). Returns the array and a layout: per entry None (NULL) or
        (buffer, allocated size, nested layout or None)."""
        if depth > MAX_DEPTH:
            raise _bad("attribute templates nested too deeply")
        n = len(reqs)
        arr = ffi.new("CK_ATTRIBUTE[]", n or 1)
        keep.append(arr)
        layout: list[Any] = []
        for i in range(n):
            r = reqs[i]
            atype, length = r[0], r[1]
            nested = r[2] if len(r) > 2 else None
            ca = arr[i]
            ca.type = atype
            if length.__class__ is not int or length < 0:
                raise _bad("attribute buffer length must be a non-negative int")
            if length == 0:
                layout.append(None)
                continue
            length = min(length, self.max_buffer)
            if self._attr_class(atype) is AttrClass.ATTRIBUTE_ARRAY:
                k = min(length // ATTRIBUTE_SIZE, MAX_NESTED)
                inner = list(nested or ())[:k]
                inner += [AttrRequest(0, 0)] * (k - len(inner))
                budget[0] -= k * ATTRIBUTE_SIZE
                if budget[0] < 0:
                    raise Pkcs11Error(ckr.DEVICE_MEMORY, "attribute buffers too large")
                sub, sublayout = self._get_template(inner, keep, budget, depth + 1)
                ca.pValue = sub
                ca.ulValueLen = k * ATTRIBUTE_SIZE
                layout.append((sub, k, sublayout))
            else:
                budget[0] -= length
                if budget[0] < 0:
                    raise Pkcs11Error(ckr.DEVICE_MEMORY, "attribute buffers too large")
                buf = ffi.new("CK_BYTE[]", length)
                keep.append(buf)
                ca.pValue = buf
                ca.ulValueLen = length
                layout.append((buf, length, None))
        return arr, layout

    def _decode_template(self, arr: Any, n: int, layout: list[Any]) -> list[Attribute]:
        out: list[Attribute] = []
        for i in range(n):
            ca = arr[i]
            atype = ca.type
            ln = ca.ulValueLen
            if ln == UNAVAILABLE:
                out.append(Attribute(atype, None, None))
                continue
            lay = layout[i]
            if lay is None or ca.pValue != lay[0]:  # size query (or a pointer not ours)
                out.append(Attribute(atype, None, ln))
                continue
            buf, alloc, sub = lay
            if sub is not None:
                k = min(ln // ATTRIBUTE_SIZE, alloc)
                out.append(Attribute(atype, self._decode_template(buf, k, sub), ln))
                continue
            m = min(ln, alloc)
            cls = self._attr_class(atype)
            value: Any
            if cls is AttrClass.BYTE:
                value = buf[0] if m else 0
            elif cls is AttrClass.ULONG:
                if m >= ULONG_SIZE:
                    value = ffi.cast("CK_ULONG *", buf)[0]
                else:
                    value = int.from_bytes(ffi.buffer(buf, m)[:], sys.byteorder)
            elif cls is AttrClass.MECHANISM_ARRAY:
                value = ffi.unpack(ffi.cast("CK_ULONG *", buf), m // ULONG_SIZE)
            else:
                value = ffi.buffer(buf, m)[:]
            out.append(Attribute(atype, value, ln))
        return out

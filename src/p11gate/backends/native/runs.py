"""The call table of the native layer: how each RPC call id maps onto its C function
(its converters, trailing outputs and run). A run is a generator: it marshals, yields
the C arguments once, is sent the CK_RV, and returns the reply values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...codec.calls import CALLS
from ...codec.values import (
    Null,
)
from ...errors import Pkcs11Error
from .cdef import ffi
from .marshal import (
    _BUFFER_CONVERTERS,
    _GET_ATTR_INBAND,
    _NULL,
    _OK,
    _REPLY_TAILS,
    _REQUEST_CONVERTERS,
    _TOO_SMALL,
    EMPTY_BUFFER,
    _bad,
    _Conv,
    _in_bytes,
    _in_find_buffer,
    _in_mechanism,
    _in_out_bytes,
    _in_random_buffer,
    _in_ulong,
    _Out,
    _Run,
    _Runner,
    _Tail,
    _tail_null,
    _tail_ulong,
)

if TYPE_CHECKING:
    from .module import NativeModule

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



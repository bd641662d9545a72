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
from collections.abc import Iterable, Sequence
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
    KyberParams,
    Mechanism,
    Null,
    ParamUpdate,
    Version,
)
from ...errors import Pkcs11Error
from .cdef import ATTRIBUTE_SIZE, CKF_OS_LOCKING_OK, ULONG_SIZE, UNAVAILABLE, ffi
from .marshal import (
    _BAD_VALUE,
    _NULL,
    _OK,
    _PARAM_BUILDERS,
    DEFAULT_MAX_BUFFER,
    KYBER_ENCAPSULATE,
    MAX_DEPTH,
    MAX_NESTED,
    _bad,
    _Run,
)
from .runs import (
    _SPECS,
)

__all__ = ["DEFAULT_MAX_BUFFER", "NativeModule"]

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

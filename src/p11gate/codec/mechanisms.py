"""CK_MECHANISM (`M`) and the C_DeriveKey2 parameter update (`P`), SPEC §4.

The parameter serializers are a table: serializer name → (read, write) over the
parameter tuples of :mod:`values`. Which mechanism uses which serializer, and which
mechanisms are parameterless, comes from the dialect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ckr
from .buffer import Reader, Writer
from .errors import ArgumentError
from .tables import Dialect
from .values import (
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
)

NULL_MECHANISM = 0xFFFFFFFF
CKM_IBM_KYBER = 0x80010024
CKM_IBM_BTC_DERIVE = 0x80070001


def _iv_reader(size: int) -> Callable[[Reader], IvParams]:
    def read(r: Reader) -> IvParams:
        iv = r.array()
        if iv is None or len(iv) != size:
            raise ArgumentError(ckr.DEVICE_ERROR, f"IV must be {size} bytes")
        return IvParams(iv)

    return read


def _iv_writer(size: int) -> Callable[[Writer, Any], None]:
    def write(w: Writer, p: Any) -> None:
        if not isinstance(p, IvParams) or p.iv is None or len(p.iv) != size:
            raise ArgumentError(ckr.MECHANISM_PARAM_INVALID, f"IV must be {size} bytes")
        w.array(p.iv)

    return write


def _w_pss(w: Writer, p: PssParams) -> None:
    w.u64(p.hash_alg)
    w.u64(p.mgf)
    w.u64(p.salt_len)


def _w_oaep(w: Writer, p: OaepParams) -> None:
    w.u64(p.hash_alg)
    w.u64(p.mgf)
    w.u64(p.source)
    w.array(p.source_data)


def _w_ecdh1(w: Writer, p: Ecdh1Params) -> None:
    w.u64(p.kdf)
    w.array(p.shared_data)
    w.array(p.public_data)


def _w_ctr(w: Writer, p: CtrParams) -> None:
    if p.cb is None or len(p.cb) != 16:
        raise ArgumentError(ckr.MECHANISM_PARAM_INVALID, "CTR block must be 16 bytes")
    w.u64(p.counter_bits)
    w.array(p.cb)


def _r_ctr(r: Reader) -> CtrParams:
    bits = r.u64()
    cb = r.array()
    if cb is None or len(cb) != 16:
        raise ArgumentError(ckr.DEVICE_ERROR, "CTR block must be 16 bytes")
    return CtrParams(bits, cb)


def _w_gcm(w: Writer, p: GcmParams) -> None:
    w.array(p.iv)
    w.u64(p.iv_bits)
    w.array(p.aad)
    w.u64(p.tag_bits)


def _w_ulong(w: Writer, p: UlongParam | HandleParam) -> None:
    w.u64(p[0])


def _w_dh(w: Writer, p: DhDeriveParams) -> None:
    w.array(p.public_value)


def _w_btc(w: Writer, p: BtcDeriveParams) -> None:
    w.u64(p.type)
    w.u64(p.child_key_index)
    w.array(p.chain_code)
    w.u64(p.version)


def _w_kyber(w: Writer, p: KyberParams) -> None:
    w.u64(p.version)
    w.u64(p.mode)
    w.u64(p.kdf)
    w.byte(p.prepend)
    w.array(p.cipher)
    w.array(p.shared_data)
    w.u64(p.secret_handle)


_Read = Callable[[Reader], Any]
_Write = Callable[[Writer, Any], None]

#: serializer name (as in tables.json) → (reader, writer, parameter tuple type)
SERIALIZERS: dict[str, tuple[_Read, _Write, type]] = {
    "rsa_pkcs_pss_mechanism": (
        lambda r: PssParams(r.u64(), r.u64(), r.u64()),
        _w_pss,
        PssParams,
    ),
    "rsa_pkcs_oaep_mechanism": (
        lambda r: OaepParams(r.u64(), r.u64(), r.u64(), r.array()),
        _w_oaep,
        OaepParams,
    ),
    "ecdh1_derive_mechanism": (
        lambda r: Ecdh1Params(r.u64(), r.array(), r.array()),
        _w_ecdh1,
        Ecdh1Params,
    ),
    "aes_iv_mechanism": (_iv_reader(16), _iv_writer(16), IvParams),
    "des_iv_mechanism": (_iv_reader(8), _iv_writer(8), IvParams),
    "aes_ctr_mechanism": (_r_ctr, _w_ctr, CtrParams),
    "aes_gcm_mechanism": (
        lambda r: GcmParams(r.array(), r.u64(), r.array(), r.u64()),
        _w_gcm,
        GcmParams,
    ),
    "mac_general_mechanism": (lambda r: UlongParam(r.u64()), _w_ulong, UlongParam),
    "dh_pkcs_derive_mechanism": (lambda r: DhDeriveParams(r.array()), _w_dh, DhDeriveParams),
    "ibm_attrbound_wrap_mechanism": (lambda r: HandleParam(r.u64()), _w_ulong, HandleParam),
    "ibm_ecdsa_other_mechanism": (lambda r: UlongParam(r.u64()), _w_ulong, UlongParam),
    "ibm_btc_derive_mechanism": (
        lambda r: BtcDeriveParams(r.u64(), r.u64(), r.array(), r.u64()),
        _w_btc,
        BtcDeriveParams,
    ),
    "ibm_kyber_mechanism": (
        lambda r: KyberParams(r.u64(), r.u64(), r.u64(), r.byte(), r.array(), r.array(), r.u64()),
        _w_kyber,
        KyberParams,
    ),
}


def read_mechanism(r: Reader, d: Dialect) -> Mechanism | None:
    mtype = r.u32()
    if d.new_mechanisms:
        if mtype == NULL_MECHANISM:
            return None
        if mtype in d.noparam:
            return Mechanism(mtype, None)
        if r.byte() == 0:
            return Mechanism(mtype, None)
    elif mtype == NULL_MECHANISM:
        # 0.25.3–0.25.5 write a NULL mechanism as the bare marker; no real type has it.
        return None
    ser = d.serializers.get(mtype)
    if ser is not None:
        return Mechanism(mtype, SERIALIZERS[ser][0](r))
    return Mechanism(mtype, r.array())


def write_mechanism(w: Writer, m: Mechanism | None, d: Dialect) -> None:
    if m is None:
        w.u32(NULL_MECHANISM)
        return
    mtype, param = m
    w.u32(mtype)
    ser = d.serializers.get(mtype)
    if d.new_mechanisms:
        if mtype in d.noparam:
            return
        if param is None:
            w.byte(0)
            return
        w.byte(1)
    elif param is None and ser is None:
        w.array(None)
        return
    if ser is not None:
        _, write, ptype = SERIALIZERS[ser]
        if not isinstance(param, ptype):
            if ptype is IvParams and isinstance(param, bytes):
                param = IvParams(param)
            else:
                raise ArgumentError(
                    ckr.MECHANISM_PARAM_INVALID, f"mechanism {mtype:#x} needs {ptype.__name__}"
                )
        write(w, param)
        return
    if isinstance(param, IvParams):
        param = param.iv
    if param is not None and not isinstance(param, bytes):
        # A structured parameter this peer has no serializer for cannot be sent.
        raise ArgumentError(ckr.MECHANISM_INVALID, f"mechanism {mtype:#x} not carried")
    w.array(param)


def read_param_update(r: Reader, mtype: int, d: Dialect) -> ParamUpdate:
    if mtype in d.noparam:
        return ParamUpdate(None)
    if r.byte() == 0:
        return ParamUpdate(False)
    if mtype == CKM_IBM_BTC_DERIVE:
        return ParamUpdate(True, None, _read_opt_data(r))
    if mtype == CKM_IBM_KYBER:
        mode = r.byte()
        data = _read_opt_data(r) if mode == 1 else None
        return ParamUpdate(True, mode, data)
    return ParamUpdate(True)


def _read_opt_data(r: Reader) -> bytes | Null | None:
    if r.byte():
        return r.array()
    return Null(r.u32())


def write_param_update(w: Writer, p: ParamUpdate, mtype: int, d: Dialect) -> None:
    if mtype in d.noparam:
        return
    if not p.present:
        w.byte(0)
        return
    w.byte(1)
    if mtype == CKM_IBM_BTC_DERIVE:
        _write_opt_data(w, p.data)
    elif mtype == CKM_IBM_KYBER:
        w.byte(p.mode or 0)
        if p.mode == 1:
            _write_opt_data(w, p.data)


def _write_opt_data(w: Writer, data: bytes | Null | None) -> None:
    if isinstance(data, Null):
        w.byte(0)
        w.u32(data.length)
    else:
        w.byte(1)
        w.array(data)

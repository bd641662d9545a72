"""The token a KMIP server presents: slot, sessions, login, objects and operations.

Object handles are the identity map's row numbers, so they stay the same across gateway
restarts. Every key operation is a KMIP call on the server; the gateway keeps no key
material, only the public attributes it reports.
"""

from __future__ import annotations

import hmac
import itertools
from dataclasses import dataclass, field
from typing import Any

from kmip.core import enums
from kmip.pie import objects as kobj

from ...codec import ckr
from ...codec.values import Null, Version
from ...errors import Pkcs11Error
from ..soft import objects as O
from ..soft.token import CKF_RW_SESSION, CKF_SERIAL_SESSION, out_buffer, pad
from ..token_backend import HeldBudget
from . import mapping as MAP
from .adopt import adopt
from .idmap import IdMap, MappedObject
from .pool import KmipPool

SLOT, MAX_SESSIONS, MAX_FIND, MAX_DATA = 1, 4096, 1 << 16, 1 << 20
TF_LOGIN_REQUIRED, TF_USER_PIN_INITIALIZED, TF_TOKEN_INITIALIZED = 0x4, 0x8, 0x400
VERSION = Version(0, 1)
CKU_USER = 1
_PURPOSE = {"sign": O.CKA_SIGN, "verify": O.CKA_VERIFY, "encrypt": O.CKA_ENCRYPT,
            "decrypt": O.CKA_DECRYPT}


@dataclass
class Op:
    uid: str
    mech: int
    params: dict[str, Any]
    iv: bytes | None
    data: bytearray = field(default_factory=bytearray)
    #: kept after a size query, so that the client's retry does not call KMIP again …
    result: bytes | None = None
    #: … and the input it was for (the one-part call's data, or None for a Final)
    result_for: bytes | None = None


@dataclass
class Session:
    handle: int
    flags: int
    ops: dict[str, Op] = field(default_factory=dict)
    found: list[int] | None = None


def _names(tpl: dict[int, int | bytes]) -> dict[int, int | bytes]:
    """The CKA_LABEL and CKA_ID of a template, for the other key of a pair."""
    return {a: v for a, v in tpl.items() if a in (O.CKA_LABEL, O.CKA_ID)}


class KmipToken:
    def __init__(self, pool: KmipPool, idmap: IdMap, objects: list[MappedObject],
                 pin: bytes, label: str) -> None:
        self.pool, self.idmap, self._pin, self.label = pool, idmap, pin, label
        self.objects: dict[int, MappedObject] = {o.handle: o for o in objects}
        self.sessions: dict[int, Session] = {}
        self.logged_in = False
        self._ids = itertools.count(1)
        self.held = HeldBudget(self._held)

    def _held(self) -> int:
        return sum(len(op.data) + len(op.result or b"") for s in self.sessions.values()
                   for op in s.ops.values())

    # ------------------------------------------------------------------ lookups

    def session(self, h: Any) -> Session:
        s = self.sessions.get(h) if isinstance(h, int) else None
        if s is None:
            raise Pkcs11Error(ckr.SESSION_HANDLE_INVALID)
        return s

    def obj(self, h: Any, rv: int = ckr.OBJECT_HANDLE_INVALID) -> MappedObject:
        o = self.objects.get(h) if isinstance(h, int) else None
        if o is None or (o.attrs.get(O.CKA_PRIVATE) and not self.logged_in):
            raise Pkcs11Error(rv)
        return o

    def used_obj(self, h: Any, rv: int = ckr.OBJECT_HANDLE_INVALID) -> MappedObject:
        """obj() for a call that acts on the object on the server: on a shared store
        the row is read again, since another process may have replaced it (idmap.add)
        since this one loaded the map."""
        o = self.obj(h, rv)
        if self.idmap.store.shared and self.idmap.uid_of(o.handle) != o.uid:
            del self.objects[o.handle]
            raise Pkcs11Error(rv)
        return o

    @staticmethod
    def _token_objects_only(*templates: dict[int, int | bytes]) -> None:
        # everything a KMIP server holds outlives the session: no session objects
        if any(t.get(O.CKA_TOKEN, 1) == 0 for t in templates):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "the KMIP token has token objects "
                              "only")

    @staticmethod
    def _sensitive_only(*templates: dict[int, int | bytes]) -> None:
        # the gateway never reads private material back, so it cannot honour these
        if any(t.get(O.CKA_EXTRACTABLE) == 1 or t.get(O.CKA_SENSITIVE) == 0
               for t in templates):
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "KMIP token keys are sensitive and "
                              "not extractable")

    def _user(self, s: Session) -> None:
        if not self.logged_in:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        if not s.flags & CKF_RW_SESSION:
            raise Pkcs11Error(ckr.SESSION_READ_ONLY)

    def _slot(self, s: Any) -> None:
        if s != SLOT:
            raise Pkcs11Error(ckr.SLOT_ID_INVALID)

    # ------------------------------------------------------------------ info

    def get_info(self, args: list[Any]) -> list[Any]:
        return [Version(2, 40), pad(b"p11gate", 32), 0, pad(b"p11gate KMIP token", 32),
                VERSION]

    def slot_list(self, args: list[Any]) -> list[Any]:
        return [Null(1)] if not isinstance(args[1], int) or args[1] < 1 else [[SLOT]]

    def slot_info(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        return [pad(b"p11gate KMIP token", 64), pad(b"p11gate", 32), 0x1, VERSION, VERSION]

    def token_info(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        flags = TF_LOGIN_REQUIRED | TF_USER_PIN_INITIALIZED | TF_TOKEN_INITIALIZED
        rw = sum(1 for s in self.sessions.values() if s.flags & CKF_RW_SESSION)
        na = 0xFFFFFFFFFFFFFFFF
        return [pad(self.label.encode(), 32), pad(b"p11gate", 32), pad(b"kmip", 16),
                pad(b"kmip", 16), flags, MAX_SESSIONS, len(self.sessions), MAX_SESSIONS, rw,
                255, 1, na, na, na, na, VERSION, VERSION, pad(b"", 16)]

    def mechanism_list(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        mechs = sorted(MAP.MECHANISMS)
        cap = args[1]
        return [Null(len(mechs))] if not isinstance(cap, int) or cap < len(mechs) else [mechs]

    def mechanism_info(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        info = MAP.MECHANISMS.get(args[1])
        if info is None:
            raise Pkcs11Error(ckr.MECHANISM_INVALID)
        return list(info)

    # ------------------------------------------------------------------ sessions, login

    def open_session(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        flags = args[1]
        if not isinstance(flags, int) or not flags & CKF_SERIAL_SESSION:
            raise Pkcs11Error(ckr.SESSION_PARALLEL_NOT_SUPPORTED)
        if len(self.sessions) >= MAX_SESSIONS:
            raise Pkcs11Error(ckr.SESSION_COUNT)
        h = next(self._ids)
        self.sessions[h] = Session(h, flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION))
        return [h]

    def close_session(self, args: list[Any]) -> list[Any]:
        del self.sessions[self.session(args[0]).handle]
        if not self.sessions:
            self.logged_in = False
        return []

    def close_all(self, args: list[Any]) -> list[Any]:
        self._slot(args[0])
        self.sessions.clear()
        self.logged_in = False
        return []

    def session_info(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        rw = bool(s.flags & CKF_RW_SESSION)
        state = (3 if rw else 1) if self.logged_in else (2 if rw else 0)
        return [SLOT, state, s.flags, 0]

    def login(self, args: list[Any]) -> list[Any]:
        self.session(args[0])
        if args[1] != CKU_USER:
            raise Pkcs11Error(ckr.USER_TYPE_INVALID)  # the KMIP token has no SO
        if self.logged_in:
            raise Pkcs11Error(ckr.USER_ALREADY_LOGGED_IN)
        pin = args[2]
        if not isinstance(pin, bytes) or not hmac.compare_digest(pin, self._pin):
            raise Pkcs11Error(ckr.PIN_INCORRECT)
        self.logged_in = True
        return []

    def logout(self, args: list[Any]) -> list[Any]:
        self.session(args[0])
        if not self.logged_in:
            raise Pkcs11Error(ckr.USER_NOT_LOGGED_IN)
        self.logged_in = False
        return []

    # ------------------------------------------------------------------ objects

    def remember(self, objs: list[tuple[str, int, dict[int, int | bytes]]],
                 made: bool = True) -> list[int]:
        """Map objects the server just ``made`` (or found, when adopting)."""
        handles = self.idmap.add(objs, made)  # persisted before anyone hears of it
        if made:
            # a handle that named a reissued UID names nothing now (idmap.add)
            uids = {uid for uid, _cls, _attrs in objs}
            for h in [h for h, o in self.objects.items() if o.uid in uids]:
                del self.objects[h]
        for h, (uid, cls, attrs) in zip(handles, objs, strict=True):
            self.objects[h] = MappedObject(h, uid, cls, attrs)
        return handles

    async def public_values(self, uid: str) -> dict[int, int | bytes]:
        key = await self.pool.call(lambda c: c.get(uid), "Get")
        return MAP.rsa_public_attrs(bytes(key.value))

    async def generate_key_pair(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        self._user(s)
        if not args[1] or args[1][0] != MAP.CKM_RSA_PKCS_KEY_PAIR_GEN:
            raise Pkcs11Error(ckr.MECHANISM_INVALID)
        pub_t, priv_t = O.parse_template(args[2] or []), O.parse_template(args[3] or [])
        self._token_objects_only(pub_t, priv_t)
        self._sensitive_only(priv_t)
        bits = pub_t.get(O.CKA_MODULUS_BITS)
        if not isinstance(bits, int):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_MODULUS_BITS")
        if not MAP.RSA_BITS[0] <= bits <= MAP.RSA_BITS[1] or bits % 8:
            raise Pkcs11Error(ckr.KEY_SIZE_RANGE)
        e = pub_t.get(O.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")
        if e not in (b"\x01\x00\x01", b"\x00\x01\x00\x01"):
            raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "the KMIP server uses e = 65537")
        label = priv_t.get(O.CKA_LABEL, pub_t.get(O.CKA_LABEL, b""))
        name = label.decode(errors="replace") if isinstance(label, bytes) and label else None
        # each key's attributes from its own template (a label or CKA_ID given for one
        # only names both), refused before anything is made if they cannot be honoured
        pub_a = MAP.key_attrs(O.CKO_PUBLIC_KEY, O.CKK_RSA, {**_names(priv_t), **pub_t}, True)
        priv_a = MAP.key_attrs(O.CKO_PRIVATE_KEY, O.CKK_RSA, {**_names(pub_t), **priv_t}, True)
        MAP.check_template(pub_t, pub_a)
        MAP.check_template(priv_t, priv_a)

        def create(c: Any) -> tuple[str, str]:
            pub, priv = c.create_key_pair(enums.CryptographicAlgorithm.RSA, bits,
                                          public_name=name, private_name=name,
                                          public_usage_mask=MAP.usage_mask(pub_a),
                                          private_usage_mask=MAP.usage_mask(priv_a))
            c.activate(pub)
            c.activate(priv)
            return str(pub), str(priv)

        pub_uid, priv_uid = await self.pool.call(create, "CreateKeyPair")
        public = await self.public_values(pub_uid)
        pub_a |= public
        priv_a.update({O.CKA_MODULUS: public[O.CKA_MODULUS],
                       O.CKA_PUBLIC_EXPONENT: public[O.CKA_PUBLIC_EXPONENT],
                       O.CKA_MODULUS_BITS: bits})
        hp, hs = self.remember([(pub_uid, O.CKO_PUBLIC_KEY, pub_a),
                                 (priv_uid, O.CKO_PRIVATE_KEY, priv_a)])
        return [hp, hs]

    async def generate_key(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        self._user(s)
        if not args[1] or args[1][0] != MAP.CKM_AES_KEY_GEN:
            raise Pkcs11Error(ckr.MECHANISM_INVALID)
        tpl = O.parse_template(args[2] or [])
        self._token_objects_only(tpl)
        self._sensitive_only(tpl)
        n = tpl.get(O.CKA_VALUE_LEN)
        if n not in (16, 24, 32):
            raise Pkcs11Error(ckr.KEY_SIZE_RANGE if isinstance(n, int) else
                              ckr.TEMPLATE_INCOMPLETE)
        assert isinstance(n, int)
        label = tpl.get(O.CKA_LABEL, b"")
        name = label.decode(errors="replace") if isinstance(label, bytes) and label else None
        a = MAP.key_attrs(O.CKO_SECRET_KEY, O.CKK_AES, tpl, True) | {O.CKA_VALUE_LEN: n}
        MAP.check_template(tpl, a)

        def create(c: Any) -> str:
            uid = c.create(enums.CryptographicAlgorithm.AES, n * 8, name=name,
                           cryptographic_usage_mask=MAP.usage_mask(a))
            c.activate(uid)
            return str(uid)

        uid = await self.pool.call(create, "Create")
        return self.remember([(uid, O.CKO_SECRET_KEY, a)])

    async def create_object(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        self._user(s)
        tpl = O.parse_template(args[1])
        self._token_objects_only(tpl)
        cls = tpl.get(O.CKA_CLASS)
        if cls in (O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
            self._sensitive_only(tpl)
        value = tpl.get(O.CKA_VALUE)
        if cls in (O.CKO_CERTIFICATE, O.CKO_SECRET_KEY) and (
                not isinstance(value, bytes) or not value):
            raise Pkcs11Error(ckr.TEMPLATE_INCOMPLETE, "CKA_VALUE")
        assert isinstance(value, bytes | None)
        label = tpl.get(O.CKA_LABEL, b"")
        name = label.decode(errors="replace") if isinstance(label, bytes) and label else None
        if cls == O.CKO_CERTIFICATE:
            if tpl.get(O.CKA_CERTIFICATE_TYPE, O.CKC_X_509) != O.CKC_X_509:
                raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "only X.509 certificates")
            assert value is not None
            mo: Any = kobj.X509Certificate(value, name=name)
            a = MAP.key_attrs(O.CKO_CERTIFICATE, 0, tpl, False) | {O.CKA_VALUE: value}
            for k in (O.CKA_SUBJECT, O.CKA_ISSUER, O.CKA_SERIAL_NUMBER):
                if isinstance(tpl.get(k), bytes):
                    a[k] = tpl[k]
            MAP.check_template(tpl, a)
        elif cls == O.CKO_SECRET_KEY and tpl.get(O.CKA_KEY_TYPE) == O.CKK_AES:
            assert value is not None
            if len(value) not in (16, 24, 32):
                raise Pkcs11Error(ckr.ATTRIBUTE_VALUE_INVALID, "AES key length")
            a = MAP.key_attrs(O.CKO_SECRET_KEY, O.CKK_AES, tpl, False)
            a[O.CKA_VALUE_LEN] = len(value)
            MAP.check_template(tpl, a)
            mo = kobj.SymmetricKey(enums.CryptographicAlgorithm.AES, len(value) * 8, value,
                                   masks=MAP.usage_mask(a), name=name)
        elif cls in (O.CKO_PRIVATE_KEY, O.CKO_PUBLIC_KEY) and tpl.get(O.CKA_KEY_TYPE) == O.CKK_RSA:
            a = MAP.key_attrs(int(cls), O.CKK_RSA, tpl, False)
            MAP.check_template(tpl, a)
            mo, public = MAP.rsa_register(int(cls), tpl, name, MAP.usage_mask(a))
            a |= public
        else:
            raise Pkcs11Error(ckr.TEMPLATE_INCONSISTENT, "the KMIP token registers X.509 "
                              "certificates, RSA keys and AES keys")

        def register(c: Any) -> str:
            uid = c.register(mo)
            if cls != O.CKO_CERTIFICATE:
                c.activate(uid)
            return str(uid)

        uid = await self.pool.call(register, "Register")
        return self.remember([(uid, int(cls), a)])

    async def destroy_object(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        self._user(s)
        o = self.used_obj(args[1])
        if not o.attrs.get(O.CKA_DESTROYABLE, 1):
            raise Pkcs11Error(ckr.ACTION_PROHIBITED)

        def destroy(c: Any) -> None:
            try:
                c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, o.uid)
            except Exception as e:  # not active (a certificate, say): Destroy decides
                if type(e).__name__ != "KmipOperationFailure":
                    raise
            c.destroy(o.uid)

        try:
            await self.pool.call(destroy, "Destroy")
        except Pkcs11Error as e:
            if e.rv != ckr.OBJECT_HANDLE_INVALID:  # gone on the server already: forget it
                raise
        self.idmap.remove(o.handle)
        del self.objects[o.handle]
        return []

    def get_attribute_value(self, args: list[Any]) -> list[Any]:
        self.session(args[0])
        o = self.obj(args[1])
        if not isinstance(args[2], list | tuple):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "template")
        attrs, rv = O.reply_attributes(O.SoftObject(o.handle, o.attrs), args[2])
        return [attrs, rv]

    async def find_init(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if s.found is not None:
            raise Pkcs11Error(ckr.OPERATION_ACTIVE)
        tpl = O.parse_template(args[1] or [])
        if self.idmap.store.shared:
            # what other gateway processes and nodes on the store mapped (or destroyed)
            self.objects = {o.handle: o for o in self.idmap.load()}
        label = tpl.get(O.CKA_LABEL)
        if self.logged_in and isinstance(label, bytes) and label and not any(
                o.attrs.get(O.CKA_LABEL) == label for o in self.objects.values()):
            await adopt(self, label)
        s.found = [h for h, o in sorted(self.objects.items())
                   if not (o.attrs.get(O.CKA_PRIVATE) and not self.logged_in)
                   and O.matches(O.SoftObject(h, o.attrs), tpl)]
        return []

    def find(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if s.found is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        if not isinstance(args[1], int) or args[1] < 0:
            raise Pkcs11Error(ckr.ARGUMENTS_BAD)
        n = min(args[1], MAX_FIND)
        out, s.found = s.found[:n], s.found[n:]
        return [out]

    def find_final(self, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if s.found is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        s.found = None
        return []

    # ------------------------------------------------------------------ operations

    def op_init(self, kind: str, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        if kind in s.ops:
            raise Pkcs11Error(ckr.OPERATION_ACTIVE)
        if not args[1] or not isinstance(args[1][0], int):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "mechanism")
        mech, param = args[1][0], args[1][1]
        o = self.used_obj(args[2], ckr.KEY_HANDLE_INVALID)
        if o.cls not in (O.CKO_PUBLIC_KEY, O.CKO_PRIVATE_KEY, O.CKO_SECRET_KEY):
            raise Pkcs11Error(ckr.KEY_HANDLE_INVALID)
        if kind in ("sign", "verify"):
            params = MAP.sign_parameters(mech, param, int(o.attrs.get(O.CKA_MODULUS_BITS, 2048)))
            iv = None
        else:
            params, iv = MAP.cipher_parameters(mech, param)
        if not o.attrs.get(_PURPOSE[kind]):
            raise Pkcs11Error(ckr.KEY_FUNCTION_NOT_PERMITTED)
        if o.attrs.get(O.CKA_KEY_TYPE) != MAP.key_type(mech):
            raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT, "key type and mechanism")
        if kind == "sign" and o.cls != O.CKO_PRIVATE_KEY:
            raise Pkcs11Error(ckr.KEY_TYPE_INCONSISTENT)
        s.ops[kind] = Op(o.uid, mech, params, iv)
        return []

    def op_update(self, kind: str, args: list[Any]) -> list[Any]:
        s = self.session(args[0])
        op = s.ops.get(kind)
        if op is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        if op.result is not None:
            # after a size query of the Final: more data would not be in its result
            s.ops.pop(kind, None)
            raise Pkcs11Error(ckr.ARGUMENTS_BAD, "the size query already ended the input")
        self._append(s, kind, op, args[1])
        return []

    def _append(self, s: Session, kind: str, op: Op, data: Any) -> None:
        if not isinstance(data, bytes) or len(op.data) + len(data) > MAX_DATA:
            s.ops.pop(kind, None)
            raise Pkcs11Error(ckr.DATA_LEN_RANGE if isinstance(data, bytes)
                              else ckr.ARGUMENTS_BAD)
        op.data += data
        try:
            self.held.take(len(data))
        except Pkcs11Error:
            s.ops.pop(kind, None)
            raise

    async def _run(self, kind: str, op: Op) -> bytes:
        data = bytes(op.data)
        if kind == "sign":
            return bytes(await self.pool.call(
                lambda c: c.sign(data, uid=op.uid, cryptographic_parameters=op.params), "Sign"))
        call = "encrypt" if kind == "encrypt" else "decrypt"

        def cipher(c: Any) -> bytes:
            out = getattr(c, call)(data, uid=op.uid, cryptographic_parameters=op.params,
                                   iv_counter_nonce=op.iv)
            return bytes(out[0] if isinstance(out, tuple) else out)

        return await self.pool.call(cipher, kind.capitalize())

    async def finish(self, kind: str, args: list[Any], data: Any) -> list[Any]:
        """C_Sign/C_Encrypt/C_Decrypt (data given) or their Final (data None)."""
        s = self.session(args[0])
        op = s.ops.get(kind)
        if op is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        cap = args[-1]
        # a size query must not repeat a KMIP call: the result is kept for the retry,
        # which must be the same call with the same data (else the client would get
        # the signature or ciphertext of the data it sent first for what it sent next)
        result, fresh = op.result, False
        if result is not None:
            if (data is None) != (op.result_for is None) or data != op.result_for:
                s.ops.pop(kind, None)
                raise Pkcs11Error(ckr.ARGUMENTS_BAD, "not the call the size query was for")
        else:
            if data is not None:
                self._append(s, kind, op, data)
            try:
                result = await self._run(kind, op)
            except Pkcs11Error:
                s.ops.pop(kind, None)
                raise
            op.result, op.result_for, fresh = result, data, True
        done, out = out_buffer(cap, result)
        if done:
            s.ops.pop(kind, None)
        elif fresh:
            try:
                self.held.take(len(result))  # kept for the retry
            except Pkcs11Error:
                s.ops.pop(kind, None)
                raise
        return [out]

    async def verify(self, args: list[Any], data: Any, signature: Any) -> list[Any]:
        s = self.session(args[0])
        op = s.ops.pop("verify", None)
        if op is None:
            raise Pkcs11Error(ckr.OPERATION_NOT_INITIALIZED)
        if data is not None:
            self._append(s, "verify", op, data)
        if not isinstance(signature, bytes):
            raise Pkcs11Error(ckr.ARGUMENTS_BAD)
        message = bytes(op.data)
        valid = await self.pool.call(lambda c: c.signature_verify(
            message, signature, uid=op.uid, cryptographic_parameters=op.params),
            "SignatureVerify")
        if valid != enums.ValidityIndicator.VALID:
            raise Pkcs11Error(ckr.SIGNATURE_INVALID)
        return []

    def generate_random(self, args: list[Any]) -> list[Any]:
        self.session(args[0])
        # PyKMIP (client and server) has no RNG Retrieve: refused, never made up locally
        raise Pkcs11Error(ckr.RANDOM_NO_RNG)

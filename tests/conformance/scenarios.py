"""The conformance scenarios, as data: PKCS#11 §5.6 login/session matrix, invalid
handles of each role, error precedence, size queries, operations after errors, finds
with subset templates, context-specific login."""

from __future__ import annotations

from p11gate.codec import Attribute, AttrRequest, Mechanism
from p11gate.codec.values import Ecdh1Params

from .ways import (
    CKF_RO_SERIAL,
    CKF_RW_SERIAL,
    SLOT,
    SO_PIN,
    Ref,
    Scenario,
    Step,
    found,
    handle_out,
    length_of,
    session_state,
)

USER_PIN = b"1234"
SO = SO_PIN.encode()
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_VALUE, CKA_KEY_TYPE, CKA_ID, CKA_SIGN, CKA_MODULUS = 0x11, 0x100, 0x102, 0x108, 0x120
CKA_EC_POINT = 0x181
CKK_EC, CKK_RSA = 3, 0
CKM_RSA_PKCS, CKM_SHA256, CKM_ECDSA, CKM_ECDH1_DERIVE = 0x1, 0x250, 0x1041, 0x1050
CKM_AES_KEY_WRAP = 0x2109
CKD_NULL = 1
#: a mechanism no module has (vendor range)
BOGUS_MECH = 0x8FFF0001
#: a handle no way ever gave out
BAD = 0x7777

ECDSA = Mechanism(CKM_ECDSA, None)
RSA = Mechanism(CKM_RSA_PKCS, None)
SHA256 = Mechanism(CKM_SHA256, None)
ECDH = Mechanism(CKM_ECDH1_DERIVE, Ecdh1Params(CKD_NULL, None, b"\x04" + b"\x01" * 64))
DATA32 = b"\x01" * 32


def ulong(t: int, v: int) -> Attribute:
    return Attribute(t, v, 8)


def byts(t: int, v: bytes) -> Attribute:
    return Attribute(t, v, len(v))


EC_PRIV = [ulong(CKA_CLASS, CKO_PRIVATE_KEY), byts(CKA_ID, b"\x01")]
CKO_SECRET_KEY, CKK_AES, CKM_EC_KEY_PAIR_GEN = 4, 0x1F, 0x1040
CKA_VERIFY, CKA_WRAP, CKA_UNWRAP, CKA_EC_PARAMS = 0x10A, 0x106, 0x107, 0x180
#: an AES session key that may neither wrap nor unwrap
AES_NO_WRAP = [ulong(CKA_CLASS, CKO_SECRET_KEY), ulong(CKA_KEY_TYPE, CKK_AES),
               Attribute(CKA_TOKEN, 0, 1), byts(CKA_VALUE, bytes(16)),
               Attribute(CKA_WRAP, 0, 1), Attribute(CKA_UNWRAP, 0, 1)]
AES_TEMPLATE = [ulong(CKA_CLASS, CKO_SECRET_KEY), ulong(CKA_KEY_TYPE, CKK_AES),
                Attribute(CKA_TOKEN, 0, 1)]
EC_GEN = Mechanism(CKM_EC_KEY_PAIR_GEN, None)
EC_GEN_PUB = [byts(CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")),
              Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_VERIFY, 1, 1), byts(CKA_ID, b"\x99")]
EC_GEN_PRIV = [Attribute(CKA_TOKEN, 0, 1), Attribute(CKA_SIGN, 1, 1), byts(CKA_ID, b"\x99")]
RSA_PRIV = [ulong(CKA_CLASS, CKO_PRIVATE_KEY), byts(CKA_ID, b"\x02")]
RSA_PUB = [ulong(CKA_CLASS, CKO_PUBLIC_KEY), byts(CKA_ID, b"\x02")]


def open_rw(name: str = "s") -> Step:
    return Step("C_OpenSession", [SLOT, CKF_RW_SERIAL], save=name, norm=handle_out)


def open_ro(name: str = "s") -> Step:
    return Step("C_OpenSession", [SLOT, CKF_RO_SERIAL], save=name, norm=handle_out)


def login(user: int = CKU_USER, pin: bytes = USER_PIN, s: str = "s") -> Step:
    return Step("C_Login", [Ref(s), user, pin])


def info(s: str = "s") -> Step:
    return Step("C_GetSessionInfo", [Ref(s)], norm=session_state)


def find(template: list[Attribute], save: str | None = None, s: str = "s") -> list[Step]:
    """C_FindObjectsInit, C_FindObjects (count compared; handles saved), Final."""
    return [Step("C_FindObjectsInit", [Ref(s), template]),
            Step("C_FindObjects", [Ref(s), 16], save=save, norm=found),
            Step("C_FindObjectsFinal", [Ref(s)])]


def key(template: list[Attribute], name: str) -> list[Step]:
    return find(template, save=name)


SCENARIOS: list[Scenario] = [
    # ---------------------------------------------------------------- §5.6 matrix
    Scenario("ro_session_user_login", [
        open_ro(), info(), login(), info(), Step("C_Logout", [Ref("s")]), info()]),
    Scenario("rw_session_user_login", [
        open_rw(), info(), login(), info(), Step("C_Logout", [Ref("s")]), info()]),
    Scenario("rw_session_so_login", [
        open_rw(), login(CKU_SO, SO), info(), Step("C_Logout", [Ref("s")]), info()]),
    Scenario("ro_session_so_login_is_refused", [
        open_ro(), login(CKU_SO, SO), info()]),
    Scenario("so_login_with_an_ro_session_open", [
        open_ro("ro"), open_rw(), login(CKU_SO, SO), info(), info("ro")]),
    Scenario("ro_open_while_so_logged_in", [
        open_rw(), login(CKU_SO, SO), open_ro("ro"), open_rw("rw2"), info("rw2")]),
    Scenario("user_login_while_so_logged_in", [
        open_rw(), login(CKU_SO, SO), login(CKU_USER), info()]),
    Scenario("so_login_while_user_logged_in", [
        open_rw(), login(CKU_USER), login(CKU_SO, SO), info()]),
    Scenario("login_twice", [
        open_rw(), login(), login(), open_rw("s2"), login(s="s2"), info("s2")]),
    Scenario("logout_when_not_logged_in", [
        open_ro(), Step("C_Logout", [Ref("s")]), login(), Step("C_Logout", [Ref("s")]),
        Step("C_Logout", [Ref("s")])]),
    Scenario("login_then_open_sees_the_login", [
        open_rw("s1"), login(s="s1"), open_ro(), info(), open_rw("s3"), info("s3")]),
    Scenario("closing_the_last_session_logs_out", [
        open_rw(), login(), Step("C_CloseSession", [Ref("s")]), open_ro("s2"), info("s2"),
        login(s="s2"), info("s2")]),
    Scenario("close_all_sessions_logs_out", [
        open_rw(), open_ro("s2"), login(), Step("C_CloseAllSessions", [SLOT]),
        info(), open_rw("s3"), info("s3")]),
    Scenario("wrong_pin_then_right_pin", [
        open_rw(), login(pin=b"0000"), info(), login(), info()]),
    Scenario("bad_user_type", [open_rw(), login(user=7)]),
    Scenario("context_specific_login_not_logged_in", [
        open_rw(), login(CKU_CONTEXT_SPECIFIC)]),
    Scenario("open_session_without_serial_flag", [
        Step("C_OpenSession", [SLOT, 2], norm=handle_out)]),
    Scenario("logout_hides_private_objects", [
        open_ro(), *find([ulong(CKA_CLASS, CKO_PRIVATE_KEY)]), login(),
        *find([ulong(CKA_CLASS, CKO_PRIVATE_KEY)], save="priv"),
        Step("C_Logout", [Ref("s")]), *find([ulong(CKA_CLASS, CKO_PRIVATE_KEY)]),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("priv", 0)])]),
    # ---------------------------------------------------------------- invalid handles
    Scenario("invalid_session_handle", [
        Step("C_GetSessionInfo", [BAD]), Step("C_CloseSession", [BAD]),
        Step("C_Login", [BAD, CKU_USER, USER_PIN]), Step("C_Logout", [BAD]),
        Step("C_FindObjectsInit", [BAD, []]), Step("C_SignInit", [BAD, ECDSA, BAD]),
        Step("C_GenerateRandom", [BAD, 16], norm=length_of),
        Step("C_GetAttributeValue", [BAD, BAD, [AttrRequest(CKA_LABEL, 32)]])]),
    Scenario("invalid_object_handle", [
        open_rw(), login(),
        Step("C_GetAttributeValue", [Ref("s"), BAD, [AttrRequest(CKA_LABEL, 32)]]),
        Step("C_GetObjectSize", [Ref("s"), BAD]),
        Step("C_SetAttributeValue", [Ref("s"), BAD, [byts(CKA_LABEL, b"x")]]),
        Step("C_DestroyObject", [Ref("s"), BAD]),
        Step("C_CopyObject", [Ref("s"), BAD, []], norm=handle_out)]),
    Scenario("invalid_key_handle_for_inits", [
        open_rw(), login(),
        Step("C_SignInit", [Ref("s"), ECDSA, BAD]),
        Step("C_VerifyInit", [Ref("s"), ECDSA, BAD]),
        Step("C_EncryptInit", [Ref("s"), RSA, BAD]),
        Step("C_DecryptInit", [Ref("s"), RSA, BAD]),
        Step("C_SignInit", [Ref("s"), ECDSA, 0]),
        # an operation was not started by the failed init
        Step("C_Sign", [Ref("s"), DATA32, 128], norm=length_of)]),
    Scenario("invalid_key_handles_for_wrap_unwrap_derive", [
        open_rw(), login(), *key(EC_PRIV, "ec"),
        Step("C_WrapKey", [Ref("s"), Mechanism(CKM_AES_KEY_WRAP, None), BAD, BAD, 512],
             norm=length_of),
        Step("C_UnwrapKey", [Ref("s"), Mechanism(CKM_AES_KEY_WRAP, None), BAD,
                             b"\x00" * 40, [ulong(CKA_CLASS, 4)]], norm=handle_out),
        Step("C_DeriveKey", [Ref("s"), ECDH, BAD,
                             [ulong(CKA_CLASS, 4), ulong(CKA_KEY_TYPE, 0x10)]],
             norm=handle_out)]),
    # ---------------------------------------------------------------- precedence
    Scenario("function_not_supported_before_handle", [
        open_rw(), login(), *key(RSA_PRIV, "rsa"),
        Step("C_SignRecoverInit", [Ref("s"), RSA, 0]),
        Step("C_SignRecoverInit", [Ref("s"), RSA, BAD]),
        Step("C_SignRecoverInit", [Ref("s"), RSA, Ref("rsa", 0)]),
        Step("C_VerifyRecoverInit", [Ref("s"), RSA, BAD])]),
    Scenario("mechanism_invalid_and_handle_invalid", [
        open_rw(), login(), *key(EC_PRIV, "ec"),
        Step("C_SignInit", [Ref("s"), Mechanism(BOGUS_MECH, None), Ref("ec", 0)]),
        Step("C_SignInit", [Ref("s"), Mechanism(BOGUS_MECH, None), BAD]),
        Step("C_EncryptInit", [Ref("s"), Mechanism(BOGUS_MECH, None), BAD])]),
    # ---------------------------------------------------------------- size queries
    Scenario("sign_size_queries", [
        open_rw(), login(), *key(RSA_PRIV, "rsa"),
        Step("C_SignInit", [Ref("s"), RSA, Ref("rsa", 0)]),
        Step("C_Sign", [Ref("s"), DATA32, 0]),       # NULL buffer: the length
        Step("C_Sign", [Ref("s"), DATA32, 10]),      # too small: the length again
        Step("C_Sign", [Ref("s"), DATA32, 256]),     # RSA PKCS#1 v1.5: same bytes
        Step("C_Sign", [Ref("s"), DATA32, 256]),     # ended
        *key(EC_PRIV, "ec"),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_Sign", [Ref("s"), DATA32, 0]),
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of)]),
    Scenario("get_attribute_value_size_queries", [
        open_ro(), *key(RSA_PUB, "pub"),
        Step("C_GetAttributeValue", [Ref("s"), Ref("pub", 0), [AttrRequest(CKA_LABEL, 0)]]),
        Step("C_GetAttributeValue", [Ref("s"), Ref("pub", 0), [AttrRequest(CKA_LABEL, 2)]]),
        Step("C_GetAttributeValue", [Ref("s"), Ref("pub", 0), [AttrRequest(CKA_LABEL, 4)]]),
        Step("C_GetAttributeValue", [Ref("s"), Ref("pub", 0),
                                     [AttrRequest(CKA_MODULUS, 0), AttrRequest(CKA_ID, 1),
                                      AttrRequest(0x7FFFFF00, 4)]]),
        Step("C_GetAttributeValue", [Ref("s"), Ref("pub", 0), [AttrRequest(CKA_MODULUS, 256)]])]),
    Scenario("digest_size_queries", [
        open_ro(), Step("C_DigestInit", [Ref("s"), SHA256]),
        Step("C_Digest", [Ref("s"), DATA32, 0]), Step("C_Digest", [Ref("s"), DATA32, 8]),
        Step("C_Digest", [Ref("s"), DATA32, 32]), Step("C_Digest", [Ref("s"), DATA32, 32])]),
    # ---------------------------------------------------------------- after errors
    Scenario("operations_after_errors", [
        open_rw(), login(), *key(EC_PRIV, "ec"), *key(RSA_PUB, "pub"),
        Step("C_Sign", [Ref("s"), DATA32, 64]),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of),
        Step("C_Sign", [Ref("s"), DATA32, 64]),
        Step("C_EncryptInit", [Ref("s"), RSA, Ref("pub", 0)]),
        Step("C_Encrypt", [Ref("s"), b"\x01" * 300, 256]),  # too long for RSA-2048
        Step("C_Encrypt", [Ref("s"), b"\x01" * 16, 256], norm=length_of),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("pub", 0)]),  # a public key cannot sign
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_SignUpdate", [Ref("s"), DATA32]),
        Step("C_SignFinal", [Ref("s"), 64], norm=length_of),
        Step("C_FindObjects", [Ref("s"), 4], norm=found),
        Step("C_FindObjectsFinal", [Ref("s")]),
        Step("C_FindObjectsInit", [Ref("s"), []]),
        Step("C_FindObjectsInit", [Ref("s"), []]),
        Step("C_FindObjectsFinal", [Ref("s")])]),
    # ---------------------------------------------------------------- finds
    Scenario("finds_with_subset_templates", [
        open_ro(), *find([]), *find([ulong(CKA_CLASS, CKO_PRIVATE_KEY)]),
        *find([Attribute(CKA_PRIVATE, 1, 1)]),
        login(), *find([]), *find([byts(CKA_ID, b"\x01")]), *find(EC_PRIV),
        *find([byts(CKA_LABEL, b"ec1")]), *find([ulong(CKA_KEY_TYPE, CKK_EC)]),
        *find([ulong(CKA_KEY_TYPE, CKK_RSA), Attribute(CKA_SIGN, 1, 1)]),
        *find([byts(CKA_LABEL, b"nothing")]), *find([Attribute(CKA_TOKEN, 0, 1)]),
        *find([Attribute(CKA_PRIVATE, 0, 1)])]),
    # ---------------------------------------------------------------- context login
    Scenario("context_specific_login", [
        open_rw(), login(), login(CKU_CONTEXT_SPECIFIC), *key(EC_PRIV, "ec"),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        login(CKU_CONTEXT_SPECIFIC), login(CKU_CONTEXT_SPECIFIC, b"0000"),
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of)]),
    # ---------------------------------------------------------------- slot/token info
    Scenario("slot_and_token_info", [
        Step("C_GetSlotInfo", [SLOT]),
        Step("C_GetTokenInfo", [SLOT], norm=lambda v: [v[4] & 0x40D]),  # flags subset
        Step("C_GetMechanismInfo", [SLOT, CKM_ECDSA]),
        Step("C_GetMechanismInfo", [SLOT, BOGUS_MECH])]),
    # ---------------------------------------------------------------- differential fuzz
    # (tests/conformance/test_differential_fuzz.py found each of these)
    Scenario("object_handles_end_with_the_last_session", [
        open_ro(), *key(RSA_PUB, "pub"), open_ro("s2"), Step("C_CloseSession", [Ref("s")]),
        Step("C_GetAttributeValue", [Ref("s2"), Ref("pub", 0), [AttrRequest(CKA_LABEL, 0)]]),
        Step("C_CloseSession", [Ref("s2")]), open_ro("s3"),
        Step("C_GetAttributeValue", [Ref("s3"), Ref("pub", 0), [AttrRequest(CKA_LABEL, 0)]])]),
    Scenario("so_login_read_only_session_first", [
        open_ro("ro"), open_rw(), login(), login(CKU_SO, SO), info()]),
    Scenario("wrong_family_key_with_an_operation_active", [
        open_rw(), login(), *key(EC_PRIV, "ec"),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_SignInit", [Ref("s"), RSA, Ref("ec", 0)]),
        Step("C_DecryptInit", [Ref("s"), RSA, Ref("ec", 0)]),
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of)]),
    Scenario("wrap_key_type_before_usage", [
        open_rw(), login(),
        Step("C_CreateObject", [Ref("s"), AES_NO_WRAP], save="aes", norm=handle_out),
        Step("C_WrapKey", [Ref("s"), RSA, Ref("aes"), Ref("aes"), 512], norm=length_of),
        Step("C_UnwrapKey", [Ref("s"), RSA, Ref("aes"), b"\x01" * 128, AES_TEMPLATE],
             norm=handle_out)]),
    Scenario("key_gone_with_its_session", [
        open_rw(), login(), open_rw("s2"),
        Step("C_GenerateKeyPair", [Ref("s2"), EC_GEN, EC_GEN_PUB, EC_GEN_PRIV],
             norm=handle_out),
        *find([byts(CKA_ID, b"\x99"), ulong(CKA_CLASS, CKO_PRIVATE_KEY)], save="k"),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("k", 0)]),  # the gateway learns its type
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of),
        Step("C_CloseSession", [Ref("s2")]),
        Step("C_SignInit", [Ref("s"), RSA, Ref("k", 0)])]),
    Scenario("unread_key_gone_with_an_operation_active", [
        open_rw(), login(), *key(EC_PRIV, "ec"), open_rw("s2"),
        Step("C_GenerateKeyPair", [Ref("s2"), EC_GEN, EC_GEN_PUB, EC_GEN_PRIV],
             norm=handle_out),
        *find([byts(CKA_ID, b"\x99"), ulong(CKA_CLASS, CKO_PRIVATE_KEY)], save="k"),
        Step("C_CloseSession", [Ref("s2")]),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("ec", 0)]),
        Step("C_SignInit", [Ref("s"), ECDSA, Ref("k", 0)]),  # its type was never read
        Step("C_Sign", [Ref("s"), DATA32, 64], norm=length_of)]),
    Scenario("digest_after_a_key_digest_and_logout", [
        open_rw(), login(), *key(EC_PRIV, "ec"),
        Step("C_DigestKey", [Ref("s"), Ref("ec", 0)]),  # no digest: refused, yet noted
        Step("C_Logout", [Ref("s")]),
        Step("C_DigestInit", [Ref("s"), SHA256]),
        Step("C_Digest", [Ref("s"), DATA32, 32]),
        Step("C_DigestInit", [Ref("s"), SHA256]),
        Step("C_Digest", [Ref("s"), DATA32, 32])]),
    # last: a pool that left a member session inside the digest (issue 15.9) would show
    # here as CKR_OPERATION_ACTIVE in later scenarios
    Scenario("digest_key_handles", [
        open_rw(), login(),
        Step("C_DigestKey", [Ref("s"), BAD]),  # no digest active
        Step("C_DigestInit", [Ref("s"), SHA256]),
        Step("C_DigestKey", [Ref("s"), BAD]),
        Step("C_Digest", [Ref("s"), DATA32, 64], norm=length_of),
        # the session goes on (on a pool: its member session is not left in a digest)
        *find(EC_PRIV)]),
]

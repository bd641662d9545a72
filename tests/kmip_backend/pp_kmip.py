"""python-pkcs11 against the KMIP token behind the gateway (a subprocess with
P11_KIT_SERVER_ADDRESS set). argv: module pin generate|reuse|destroy. Prints JSON."""

from __future__ import annotations

import json
import sys

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label="kmip")
out: dict[str, object] = {}
msg = b"message signed by the KMIP server"
with tok.open(user_pin=sys.argv[2], rw=True) as s:
    if sys.argv[3] == "generate":
        s.generate_keypair(KeyType.RSA, 2048, store=True, label="pp-rsa", id=b"\x12")
        s.generate_key(KeyType.AES, 256, store=True, label="pp-aes", id=b"\x13")
        try:
            s.generate_keypair(KeyType.EC, 256, store=True, label="pp-ec")
            out["ec"] = "generated"
        except pkcs11.exceptions.PKCS11Error as e:
            out["ec"] = type(e).__name__
    priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x12")
    pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, id=b"\x12")
    aes = s.get_key(object_class=ObjectClass.SECRET_KEY, label="pp-aes")
    out["modulus"] = pub[Attribute.MODULUS].hex()
    out["exponent"] = pub[Attribute.PUBLIC_EXPONENT].hex()
    out["sig"] = priv.sign(msg, mechanism=Mechanism.SHA256_RSA_PKCS).hex()
    out["verify_good"] = pub.verify(msg, bytes.fromhex(str(out["sig"])),
                                    mechanism=Mechanism.SHA256_RSA_PKCS)
    out["verify_bad"] = pub.verify(msg + b"!", bytes.fromhex(str(out["sig"])),
                                   mechanism=Mechanism.SHA256_RSA_PKCS)
    for what, obj, attr in (("private_exponent", priv, Attribute.PRIVATE_EXPONENT),
                            ("aes_value", aes, Attribute.VALUE)):
        try:
            obj[attr]
            out[what] = "readable"
        except pkcs11.exceptions.AttributeSensitive:
            out[what] = "sensitive"
    out["aes_len"] = aes[Attribute.VALUE_LEN]
    out["labels"] = sorted(o[Attribute.LABEL] for o in s.get_objects({}))
    try:
        s.generate_random(256)
        out["random"] = "made"
    except pkcs11.exceptions.PKCS11Error as e:
        out["random"] = type(e).__name__
    if sys.argv[3] == "destroy":
        aes.destroy()
        out["after_destroy"] = sorted(o[Attribute.LABEL] for o in s.get_objects({}))
print(json.dumps(out))

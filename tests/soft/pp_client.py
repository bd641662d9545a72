"""python-pkcs11 against a soft token behind the gateway (run as a subprocess with
P11_KIT_SERVER_ADDRESS set). Prints JSON: public keys and signatures, hex."""

from __future__ import annotations

import hashlib
import json
import sys

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label="soft")
out: dict[str, object] = {}
msg = b"message signed by the soft token"
with tok.open(user_pin=sys.argv[2], rw=True) as s:
    if sys.argv[3] == "generate":
        params = s.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        ecpub, ecpriv = params.generate_keypair(store=True, label="pp-ec", id=b"\x11")
        rsapub, rsapriv = s.generate_keypair(KeyType.RSA, 2048, store=True, label="pp-rsa",
                                             id=b"\x12")
        aes = s.generate_key(KeyType.AES, 256, store=True, label="pp-aes", id=b"\x13")
    ecpriv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x11")
    ecpub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, id=b"\x11")
    rsapriv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x12")
    rsapub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, id=b"\x12")
    aes = s.get_key(object_class=ObjectClass.SECRET_KEY, label="pp-aes")
    out["ec_point"] = ecpub[Attribute.EC_POINT].hex()
    out["modulus"] = rsapub[Attribute.MODULUS].hex()
    out["exponent"] = rsapub[Attribute.PUBLIC_EXPONENT].hex()
    # (p11-kit-client refuses ECDSA_SHA256 and SHA256_RSA_PKCS_PSS it does not know:
    # those are unit-tested; here the hash is made by the client)
    digest = hashlib.sha256(msg).digest()
    out["ec_sig"] = ecpriv.sign(digest, mechanism=Mechanism.ECDSA).hex()
    out["rsa_sig"] = rsapriv.sign(msg, mechanism=Mechanism.SHA256_RSA_PKCS).hex()
    out["pss_sig"] = rsapriv.sign(
        digest, mechanism=Mechanism.RSA_PKCS_PSS,
        mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA256, 32)).hex()
    out["verify_ec"] = ecpub.verify(digest, bytes.fromhex(str(out["ec_sig"])),
                                    mechanism=Mechanism.ECDSA)
    out["verify_bad"] = rsapub.verify(msg + b"!", bytes.fromhex(str(out["rsa_sig"])),
                                      mechanism=Mechanism.SHA256_RSA_PKCS)
    # (AES-CBC-PAD/GCM: this p11-kit-client refuses them itself; unit-tested)
    out["aes_len"] = aes[Attribute.VALUE_LEN]
    try:
        aes[Attribute.VALUE]
        out["aes_value"] = "readable"
    except pkcs11.exceptions.AttributeSensitive:
        out["aes_value"] = "sensitive"
    out["labels"] = sorted(o[Attribute.LABEL] for o in s.get_objects({}))
    out["random"] = len(s.generate_random(256))
    out["digest"] = s.digest(msg, mechanism=Mechanism.SHA256).hex()
with tok.open() as s:  # public session: private keys are not visible
    out["public_labels"] = sorted(o[Attribute.LABEL] for o in s.get_objects({}))
print(json.dumps(out))

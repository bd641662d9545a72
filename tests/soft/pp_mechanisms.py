"""python-pkcs11 exercising the soft token's mechanisms that Debian's p11-kit-client
(0.24) carries, behind the gateway (run as a subprocess with P11_KIT_SERVER_ADDRESS
set). Prints JSON, hex: the test checks every value with `cryptography`."""

from __future__ import annotations

import json
import sys

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label="soft")
out: dict[str, object] = {}
msg = b"soft token mechanisms through python-pkcs11"
with tok.open(user_pin=sys.argv[2], rw=True) as s:
    for curve in ("secp384r1", "secp521r1"):
        params = s.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
            local=True)
        pub, priv = params.generate_keypair()
        out[f"{curve}_point"] = pub[Attribute.EC_POINT].hex()
        out[f"{curve}_sig"] = priv.sign(msg, mechanism=Mechanism.ECDSA_SHA1).hex()
    rsapub, rsapriv = s.generate_keypair(KeyType.RSA, 2048)
    out["modulus"] = rsapub[Attribute.MODULUS].hex()
    out["sha1_rsa_sig"] = rsapriv.sign(msg, mechanism=Mechanism.SHA1_RSA_PKCS).hex()
    oaep = (Mechanism.SHA256, MGF.SHA256, None)
    ct = rsapub.encrypt(b"oaep secret", mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=oaep)
    out["oaep_round_trip"] = rsapriv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP,
                                             mechanism_param=oaep).hex()
    gen = s.generate_key(KeyType.GENERIC_SECRET, 256,
                         template={Attribute.SIGN: True, Attribute.VERIFY: True})
    mac = gen.sign(msg, mechanism=Mechanism.SHA256_HMAC)
    out["hmac_len"] = len(mac)
    out["hmac_verify"] = gen.verify(msg, mac, mechanism=Mechanism.SHA256_HMAC)
    out["hmac_verify_bad"] = gen.verify(msg + b"!", mac, mechanism=Mechanism.SHA256_HMAC)
    aes = s.generate_key(KeyType.AES, 128, template={Attribute.ENCRYPT: True,
                                                      Attribute.DECRYPT: True})
    block = bytes(range(32))
    ect = aes.encrypt(block, mechanism=Mechanism.AES_ECB)
    out["ecb_round_trip"] = aes.decrypt(ect, mechanism=Mechanism.AES_ECB).hex()
    out["ecb_len"] = len(ect)
    for name, m in (("sha1", Mechanism.SHA_1), ("sha384", Mechanism.SHA384),
                    ("sha512", Mechanism.SHA512)):
        out[f"digest_{name}"] = s.digest(msg, mechanism=m).hex()
    out["mechanisms"] = sorted(int(m) for m in tok.slot.get_mechanisms())
print(json.dumps(out))

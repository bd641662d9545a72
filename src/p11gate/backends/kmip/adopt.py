"""Keys made outside the gateway: found by their KMIP Name, mapped once.

A logged-in search by a CKA_LABEL that no mapped object has becomes a KMIP Locate by
Name; the RSA and AES objects found (at most 16) join the identity map with an empty
CKA_ID, their public values read with Get.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmip.core import enums

from ..soft import objects as O
from . import mapping as MAP

if TYPE_CHECKING:
    from .token import KmipToken


async def adopt(t: KmipToken, label: bytes) -> None:
    name = label.decode(errors="replace")

    def locate(c: Any) -> list[tuple[str, Any, Any, Any]]:
        f = c.attribute_factory
        uids = c.locate(attributes=[f.create_attribute(enums.AttributeType.NAME, name)])
        out = []
        for uid in uids[:16]:
            _, attrs = c.get_attributes(uid, ["Object Type", "Cryptographic Algorithm",
                                              "Cryptographic Length"])
            kinds = {a.attribute_name.value: a.attribute_value.value for a in attrs}
            out.append((str(uid), kinds.get("Object Type"),
                        kinds.get("Cryptographic Algorithm"), kinds.get("Cryptographic Length")))
        return out

    known = {o.uid for o in t.objects.values()}
    new: list[tuple[str, int, dict[int, int | bytes]]] = []
    rsa, aes = enums.CryptographicAlgorithm.RSA, enums.CryptographicAlgorithm.AES
    for uid, otype, alg, length in await t.pool.call(locate, "Locate"):
        if uid in known:
            continue
        tpl: dict[int, int | bytes] = {O.CKA_LABEL: label}
        if otype == enums.ObjectType.PUBLIC_KEY and alg == rsa:
            a = MAP.key_attrs(O.CKO_PUBLIC_KEY, O.CKK_RSA, tpl, False)
            new.append((uid, O.CKO_PUBLIC_KEY, a | await t.public_values(uid)))
        elif otype == enums.ObjectType.PRIVATE_KEY and alg == rsa:
            a = MAP.key_attrs(O.CKO_PRIVATE_KEY, O.CKK_RSA, tpl, False)
            if isinstance(length, int):  # PSS parameters are checked against it
                a[O.CKA_MODULUS_BITS] = length
            new.append((uid, O.CKO_PRIVATE_KEY, a))
        elif otype == enums.ObjectType.SYMMETRIC_KEY and alg == aes:
            new.append((uid, O.CKO_SECRET_KEY,
                        MAP.key_attrs(O.CKO_SECRET_KEY, O.CKK_AES, tpl, False)))
    # another search may have adopted some while this one waited on the server
    known = {o.uid for o in t.objects.values()}
    new = [n for n in new if n[0] not in known]
    if new:
        t.remember(new, made=False)

"""PKCS#11 URIs (RFC 7512): the names p11tool, OpenSSL's pkcs11 provider and GnuTLS use.

Only the token-naming path attributes matter to the gateway: ``token`` (the label),
``manufacturer``, ``serial``, ``model`` and ``slot-id``. Values are percent-decoded on
parsing and percent-encoded on formatting, so a label with spaces or ``;`` survives the
round trip. Anything else (object attributes, ``pin-value`` and other query attributes)
is refused with a message that names it: a selection that silently ignored part of what
the operator wrote could pick the wrong token.
"""

from __future__ import annotations

import urllib.parse

#: URI attribute → TokenSelect field
TOKEN_ATTRIBUTES = {
    "token": "label",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "slot-id": "slot_id",
}

#: the order p11tool prints them in (RFC 7512 leaves it free)
_FORMAT_ORDER = ("model", "manufacturer", "serial", "token")

#: RFC 7512 pk11-pchar: unreserved, sub-delims without ";", ":", "[", "]", "@", "&", "+", "="
#: are left as they are; everything else is percent-encoded
_SAFE = "-._~:[]@!$'()*,&+="


def parse_token_uri(uri: str) -> dict[str, str | int]:
    """The TokenSelect fields a ``pkcs11:`` URI names. ValueError says what is wrong."""
    if not uri.startswith("pkcs11:"):
        raise ValueError(f"a PKCS#11 URI starts with 'pkcs11:' (got {uri[:40]!r})")
    rest = uri[len("pkcs11:"):]
    path, _, query = rest.partition("?")
    if query:
        names = sorted({q.partition("=")[0] for q in query.split("&") if q})
        raise ValueError(f"query attributes ({', '.join(names)}) are not used to select a "
                         "token; PINs belong in backend_pin_file/backend_pin_env")
    out: dict[str, str | int] = {}
    for part in path.split(";"):
        if not part:
            continue
        name, eq, raw = part.partition("=")
        if not eq:
            raise ValueError(f"attribute {name!r} has no value (write {name}=…)")
        field = TOKEN_ATTRIBUTES.get(name)
        if field is None:
            known = ", ".join(TOKEN_ATTRIBUTES)
            raise ValueError(f"attribute {name!r} does not name a token (known: {known})")
        if field in out:
            raise ValueError(f"attribute {name!r} given twice")
        try:
            value = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"attribute {name!r}: percent-encoding is not UTF-8") from None
        if field == "slot_id":
            if not value.isdigit():
                raise ValueError(f"slot-id must be a decimal number (got {value!r})")
            out[field] = int(value)
        else:
            out[field] = value
    if not out:
        raise ValueError("the URI names no token attribute (e.g. pkcs11:token=NAME)")
    return out


def format_token_uri(token: str, manufacturer: str | None = None, model: str | None = None,
                     serial: str | None = None) -> str:
    """``pkcs11:model=…;manufacturer=…;serial=…;token=…`` (empty attributes left out)."""
    values = {"token": token, "manufacturer": manufacturer, "model": model, "serial": serial}
    parts = [f"{k}={urllib.parse.quote(v, safe=_SAFE)}"
             for k in _FORMAT_ORDER if (v := values[k])]
    return "pkcs11:" + ";".join(parts)


def padded_text(raw: bytes | str) -> str:
    """A blank-padded CK_UTF8CHAR field as text (what tools print)."""
    b = raw.encode() if isinstance(raw, str) else bytes(raw)
    return b.decode("utf-8", errors="replace").rstrip(" \x00")

"""fnmatch on RFC 4514 names that a certificate's values cannot fool.

In an RFC 4514 string a separator (``,`` between RDNs, ``+`` inside one) is only ever
unescaped: a value's own ``,`` or ``+`` is written ``\\,`` / ``\\+``. Plain fnmatch does
not know that: ``*`` takes the backslash and the pattern's ``,`` then matches the
value's comma, so a certificate whose CN alone is ``evil,O=Team A`` (RFC 4514
``CN=evil\\,O=Team A``) matched ``CN=*,O=Team A`` and got Team A's rule. Here each
escape sequence (backslash and the character after it) is one unit that only the same
escape in the pattern matches, never a pattern's literal separator, and ``*`` / ``?``
take whole units. Otherwise it is fnmatch: ``*`` still crosses real separators.
"""

from __future__ import annotations

import fnmatch
import re

_ESCAPE = re.compile(r"\\.", re.DOTALL)
#: supplementary private use planes: where the stand-ins for escapes are taken from
_FIRST, _END = 0xF0000, 0x110000


def name_matches(name: str, pattern: str) -> bool:
    """Whether the RFC 4514 ``name`` matches the fnmatch ``pattern`` (case-sensitive),
    with escapes as units (see the module docstring)."""
    units = sorted(set(_ESCAPE.findall(name)) | set(_ESCAPE.findall(pattern)))
    if not units:
        return fnmatch.fnmatchcase(name, pattern)
    used = set(name) | set(pattern)
    # one stand-in character per distinct escape, none that either string holds
    free = (chr(c) for c in range(_FIRST, _END) if chr(c) not in used)
    table = dict(zip(units, free, strict=False))
    if len(table) < len(units):  # cannot happen with names of sane length: fail closed
        return False

    def swap(text: str) -> str:
        return _ESCAPE.sub(lambda m: table[m.group()], text)

    return fnmatch.fnmatchcase(swap(name), swap(pattern))

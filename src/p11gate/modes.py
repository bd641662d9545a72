"""Permission modes in the configuration: ``0o660`` (a TOML integer) or ``"0660"``.

A string is always octal, as chmod reads it; an integer is taken as it is and must be a
plain permission (0 to 0o777), which also catches the decimal ``660`` or ``600`` that
someone meant as octal (they would be 0o1224 and 0o1130: the owner shut out).
"""

from __future__ import annotations

import re

_OCTAL = re.compile(r"^(?:0[oO]?)?([0-7]{1,4})$")
_HELP = 'give an octal string such as "0660" or "0o660", or a TOML integer such as 0o660'


def parse_mode(v: object) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a permission mode; {_HELP}")
    if isinstance(v, int):
        if not 0 <= v <= 0o777:
            hint = (f" (decimal {v}; did you mean 0o{v}?)"
                    if re.fullmatch(r"[0-7]{3}", str(v)) else "")
            raise ValueError(f"{v} is not a permission mode between 0 and 0o777{hint}; {_HELP}")
        return v
    if isinstance(v, str):
        m = _OCTAL.match(v.strip())
        if m is None:
            raise ValueError(f"{v!r} is not an octal permission mode; {_HELP}")
        mode = int(m.group(1), 8)
        if mode > 0o777:
            raise ValueError(f"{v!r} is above 0o777 (no setuid, setgid or sticky bits); "
                             f"{_HELP}")
        return mode
    raise ValueError(f"{v!r} is not a permission mode; {_HELP}")

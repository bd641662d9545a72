"""Wire dialects and the per-release tables they use (SPEC §1.4, §4, Appendix A/B).

The negotiated version byte does not decide the wire format; the release of the peer
does. A server picks the dialect from the byte the client *offers* (0 → 0.24.x, 1 →
0.25.0–0.25.5, 2 → ≥ 0.25.6), a client from the byte the server *answers*.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from . import tables_data as data


class AttrClass(IntEnum):
    BYTE = 0
    ULONG = 1
    BYTE_ARRAY = 2
    DATE = 3
    MECHANISM_ARRAY = 4
    ATTRIBUTE_ARRAY = 5


def _attr_classes(prefix: str) -> dict[int, AttrClass]:
    out: dict[int, AttrClass] = {}
    for name, cls in (
        ("BYTE", AttrClass.BYTE),
        ("ULONG", AttrClass.ULONG),
        ("ATTRIBUTE_ARRAY", AttrClass.ATTRIBUTE_ARRAY),
        ("MECHANISM_TYPE_ARRAY", AttrClass.MECHANISM_ARRAY),
        ("DATE", AttrClass.DATE),
    ):
        for t in getattr(data, f"{prefix}_{name}"):
            out[t] = cls
    return out


# Serializers present from 0.25.0; these three came in 0.25.6 (SPEC §4.3).
_SER_SINCE_0256 = {0x80010031, 0x80070001, 0x80010024}


@dataclass(frozen=True, slots=True)
class Dialect:
    """Everything about the peer's release that changes bytes on the wire."""

    name: str
    #: protocol version byte this dialect corresponds to
    version: int
    #: new mechanism framing (≥ 0.25.6): bare parameterless types, has-parameter byte
    new_mechanisms: bool
    #: parameterless mechanism types (Appendix A)
    noparam: frozenset[int]
    #: mechanism type → serializer name (§4.3)
    serializers: dict[int, str]
    #: attribute type → value class; anything absent is BYTE_ARRAY (Appendix B)
    attr_classes: dict[int, AttrClass]
    #: highest call id known to this release
    max_call_id: int
    #: ≥ 0.25.4: ATTRIBUTE_ARRAY entries in fA carry a nested fA body
    nested_fa: bool

    def attr_class(self, attr_type: int) -> AttrClass:
        return self.attr_classes.get(attr_type, AttrClass.BYTE_ARRAY)


V0241 = Dialect(
    name="0.24",
    version=0,
    new_mechanisms=False,
    noparam=data.V0241_NOPARAM,
    serializers={int(k): v for k, v in data.V0241_SER.items()},
    attr_classes=_attr_classes("V0241"),
    max_call_id=65,
    nested_fa=False,
)

V025 = Dialect(
    name="0.25",
    version=1,
    new_mechanisms=False,
    noparam=data.V0264_NOPARAM,
    serializers={
        int(k): v for k, v in data.V0264_SER.items() if int(k) not in _SER_SINCE_0256
    },
    attr_classes=_attr_classes("V0264"),
    max_call_id=88,
    nested_fa=True,
)

V026 = Dialect(
    name="0.26",
    version=2,
    new_mechanisms=True,
    noparam=data.V0264_NOPARAM,
    serializers={int(k): v for k, v in data.V0264_SER.items()},
    attr_classes=_attr_classes("V0264"),
    max_call_id=89,
    nested_fa=True,
)

#: highest protocol version this implementation speaks
MAX_VERSION = 2


def dialect_for_version(version: int) -> Dialect:
    """The dialect a peer of that version byte speaks (offered by a client, or answered
    by a server to an offer of 2)."""
    if version <= 0:
        return V0241
    if version == 1:
        return V025
    return V026

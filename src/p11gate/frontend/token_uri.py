"""The PKCS#11 URI of a virtual token as clients see it through the gateway.

C_GetTokenInfo through the gateway answers the token's name as its label and the
backend token's manufacturer, model and serial number; the URI names the same. A pool's
members are different tokens with different serial numbers (the one a client sees
depends on the member that answers), so a pool token's URI leaves the serial out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backends.pool.pool import PoolBackend
from ..codec.calls import CallId
from ..errors import BackendUnavailable, Pkcs11Error
from ..pkcs11_uri import format_token_uri, padded_text

if TYPE_CHECKING:
    from .token import VirtualToken

C_GetTokenInfo = CallId.C_GetTokenInfo


def configured_uri(name: str) -> str:
    """What the configuration alone tells: the label (unique among the gateway's tokens)."""
    return format_token_uri(padded_text(name.encode()[:32]))


async def client_uri(token: VirtualToken) -> str:
    """The full URI, read from the backend token (falls back to the label alone)."""
    try:
        info = await token.backend.call(C_GetTokenInfo, [token.backend_slot])
    except (Pkcs11Error, BackendUnavailable, TimeoutError):
        return configured_uri(token.name)
    serial = None if isinstance(token.backend, PoolBackend) else padded_text(info[3])
    return format_token_uri(padded_text(token.label), manufacturer=padded_text(info[1]),
                            model=padded_text(info[2]), serial=serial)

"""The one place an exception raised while serving a call becomes its reply.

Every path (the async path, the hot path's prepare and done-callback, the raw relay)
answers through :func:`error_reply`, so one failure gets one answer wherever it happens:

* policy refusals (``Denied``): their CK_RV, logged and audited as a denial;
* ``Pkcs11Error`` (``BackendUnavailable`` included, which carries CKR_DEVICE_ERROR) and
  the codec's ``ArgumentError``: their CK_RV;
* ``TimeoutError`` (a backend past its deadline): CKR_DEVICE_ERROR;
* any other ``CodecError``: CKR_DEVICE_ERROR. It means an answer from the device that
  the gateway cannot carry to this client (the worker's malformed reply, a value its
  dialect cannot encode); the request was fine, so not CKR_GENERAL_ERROR, and the back
  end's reply decoder (backends/rpc_client.py) gives the same code for the same cause;
* anything else is the gateway's own fault: CKR_GENERAL_ERROR, logged with its trace.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..codec import ArgumentError, Call, CodecError, ckr, encode_error
from ..errors import Pkcs11Error
from ..policy import Denied
from .limits import refusal_log

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("p11gate.conn")


def error_rv(exc: BaseException) -> int:
    """The CK_RV a failure is answered with (see the module's docstring)."""
    if isinstance(exc, Pkcs11Error | ArgumentError):
        return exc.rv
    if isinstance(exc, TimeoutError | CodecError):
        return ckr.DEVICE_ERROR
    return ckr.GENERAL_ERROR


def error_reply(c: ClientConnection, call: Call, exc: BaseException) -> bytes:
    """The ERROR reply body for ``exc``; logs what must be logged (never arguments)."""
    if isinstance(exc, Denied):
        c._denied(call, exc)
    elif isinstance(exc, CodecError) and not isinstance(exc, ArgumentError):
        refusal_log.record(logging.ERROR, "cannot carry the reply", who=c.identity.key, conn=c.id,
                           call=call.name, error=str(exc))
    elif not isinstance(exc, Pkcs11Error | ArgumentError | TimeoutError):
        refusal_log.record(logging.ERROR, "internal error", who=c.identity.key, exc_info=exc,
                           conn=c.id, call=call.name)
    return encode_error(error_rv(exc))

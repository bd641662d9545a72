"""Errors shared across layers."""

from __future__ import annotations

from .codec import ckr


class Pkcs11Error(Exception):
    """A PKCS#11 function result other than CKR_OK, to be returned to the client."""

    def __init__(self, rv: int, detail: str = "") -> None:
        super().__init__(f"{ckr.name(rv)}{': ' + detail if detail else ''}")
        self.rv = rv


class BackendUnavailable(Pkcs11Error):
    """The backend died, hung past its deadline or is restarting. Carries CKR_DEVICE_ERROR
    so callers that do not care can return it as is."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(ckr.DEVICE_ERROR, detail)


class DeadlineExceeded(BackendUnavailable):
    """A call missed its deadline: the worker was killed under it, or (in-process) its
    thread is left hung in the module."""

"""In-process access to a vendor PKCS#11 module through cffi (ABI mode).

:class:`NativeModule` is used by the ``p11gate worker`` process (isolation) and by
:class:`p11gate.backends.inprocess.InProcessBackend` (lowest latency).
"""

from .module import DEFAULT_MAX_BUFFER, NativeModule

__all__ = ["DEFAULT_MAX_BUFFER", "NativeModule"]

"""Reading KMIP messages from the server within bounds.

PyKMIP's reader trusts the server: it reads as many bytes as a message header announces
(up to 4 GiB, copying the whole message again at every chunk) and its socket timeout
counts per read, so a server that sends one byte now and then holds the connection's
thread for ever, long after the PKCS#11 caller got CKR_DEVICE_ERROR at the call
deadline. This reader refuses a message longer than MAX_MESSAGE from its header, and
stops reading and writing at the deadline of the call it serves.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any

from kmip.core.utils import BytearrayStream
from kmip.services.kmip_protocol import KMIPProtocol

#: the longest message read from a KMIP server: every reply to what the gateway asks
#: is far shorter (at most 1 MiB of data, a certificate, a Locate list)
MAX_MESSAGE = 4 << 20
_CHUNK = 1 << 16


class MessageRefused(Exception):
    """The server's message is too long or late: the connection is dropped."""


class BoundedProtocol(KMIPProtocol):
    def __init__(self, sock: Any, timeout: float) -> None:
        super().__init__(sock)
        self.timeout = timeout
        #: time.monotonic() by which the current call must be done
        self.deadline = math.inf

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MessageRefused("the call's deadline passed")
        self.socket.settimeout(min(left, self.timeout))

    def write(self, data: Any) -> None:
        self._arm()
        super().write(data)

    def read(self) -> BytearrayStream:
        header = self._recv_all(self.HEADER_SIZE)
        (size,) = struct.unpack("!I", header[4:])
        if size > MAX_MESSAGE:
            raise MessageRefused(f"a {size}-byte message")
        return BytearrayStream(header + self._recv_all(size))

    def _recv_all(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._arm()
            chunk = self.socket.recv(min(n - len(buf), _CHUNK))
            if not chunk:
                raise EOFError("the KMIP server closed the connection")
            buf += chunk
        return bytes(buf)

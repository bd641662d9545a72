"""The p11-kit module file that makes `p11-kit-proxy.so` users see the gateway's tokens.

p11-kit reads ``/etc/pkcs11/modules/*.module`` (and ``~/.config/pkcs11/modules`` for a
non-root user); a file with a ``remote:`` line makes every application that loads the
proxy (Firefox, GnuTLS and p11tool, OpenSSL's pkcs11 provider pointed at the proxy)
talk p11-kit RPC to that address: a unix socket of the gateway on this host
(``remote: unix:path=…``) or a command whose stdin/stdout carry the stream
(``remote: |p11gate tunnel …`` to a gateway over TLS).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

SYSTEM_MODULE_FILE = "/etc/pkcs11/modules/p11gate.module"


def _no_space(what: str, value: str) -> str:
    # p11-kit splits a `|command` line at spaces and knows no quoting
    if any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} contains a space, which a p11-kit module "
                         "file cannot carry")
    return value


def local_module_file(address: str) -> str:
    if not address.startswith("unix:path="):
        raise ValueError(f"not a unix socket address: {address!r}")
    return ("# p11gate: this host's gateway, for applications that load p11-kit-proxy.so\n"
            f"remote: {_no_space('address', address)}\n")


def p11gate_command() -> str:
    """The absolute path of the `p11gate` command (applications' PATH may lack it)."""
    beside = os.path.join(os.path.dirname(sys.executable), "p11gate")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("p11gate") or "p11gate"


def tunnel_module_file(gateways: Sequence[str], cert: str | None, key: str | None,
                       ca: str | None, command: str | None = None) -> str:
    """``remote: |p11gate tunnel …``; certificate options left out are taken by the
    tunnel from P11GATE_TLS_CERT/KEY/CA in the application's environment."""
    words = [command or p11gate_command(), "tunnel"]
    for opt, path in (("--cert", cert), ("--key", key), ("--ca", ca)):
        if path is not None:
            words += [opt, _no_space(opt, os.path.abspath(path))]
    for g in gateways:
        if not g.startswith("tls:"):
            raise ValueError(f"a gateway is tls:HOST:PORT (got {g!r})")
        words.append(_no_space("gateway", g))
    return ("# p11gate: remote gateways over TLS, for applications that load "
            "p11-kit-proxy.so\n"
            f"remote: |{' '.join(_no_space('command', w) for w in words)}\n")


def install(text: str, path: str) -> str:
    """Write the file (into ``path``, or as ``path/p11gate.module`` for a directory),
    readable by every application; returns the file written."""
    if os.path.isdir(path):
        path = os.path.join(path, "p11gate.module")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path

"""p11gate: a PKCS#11 gateway speaking the p11-kit RPC protocol."""

__version__ = "0.1.0"

"""The KMIP back end: a KMIP server (TTLV over TLS) presented as one PKCS#11 token."""

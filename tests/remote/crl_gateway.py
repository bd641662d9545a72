"""A gateway of its own whose CRL a test publishes as it goes (tests/remote/test_clients.py,
tests/adversarial/test_review4_dec07_crl.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from tests.gateway_proc import Gateway
from tests.remote.tls_setup import free_port, open_config, refused


class CrlGateway:
    """A gateway of its own, with a CA whose CRL the test publishes as it goes, and two
    client certificates ("keep", "revoke")."""

    def __init__(self, setup: dict[str, Any], tmp: Path, first_crl_days: float,
                 check_interval: float = 0.2, processes: int = 1) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from tests.remote.pki import CA

        self.tmp, enc = tmp, serialization.Encoding.PEM
        self.ca = CA("reload CA")
        self.files: dict[str, Path] = {"ca": tmp / "ca.pem"}
        self.files["ca"].write_bytes(self.ca.cert.public_bytes(enc))
        self.issued = {}
        for name, sans in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           ("keep", None), ("revoke", None)):
            cert, key = self.ca.issue(name, server=name == "server", sans=sans)
            self.issued[name] = cert
            self.files[f"{name}.pem"] = tmp / f"{name}.pem"
            self.files[f"{name}.pem"].write_bytes(cert.public_bytes(enc))
            self.files[f"{name}.key"] = tmp / f"{name}.key"
            self.files[f"{name}.key"].write_bytes(key.private_bytes(
                enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.crl = tmp / "crl.pem"
        self.publish([], first_crl_days)
        self.port = free_port()
        cfg = open_config(tmp / "gw", setup["token"], {
            "server.pem": self.files["server.pem"], "server.key": self.files["server.key"],
            "ca": self.files["ca"], "crl": self.crl}, self.port)
        cfg.write_text(cfg.read_text().replace(
            f'crl = "{self.crl}"', f'crl = "{self.crl}"\ncrl_check_interval = {check_interval}'))
        if processes != 1:
            cfg.write_text(cfg.read_text().replace(
                "[server]\n", f"[server]\nprocesses = {processes}\n", 1))
        self.config = cfg
        self.gw = Gateway(cfg)

    def publish(self, revoked: list[str], days: float, junk: bool = False) -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        # CRL times have one-second resolution, and OpenSSL uses the newest CRL of a CA:
        # two published within one second would tie, and either might win. Each one
        # here is issued at least a second after the one before.
        last = getattr(self, "_last_update", None)
        while True:
            now = dt.datetime.now(dt.UTC)
            issued = (now - dt.timedelta(seconds=1)).replace(microsecond=0)
            if last is None or issued > last:
                break
            time.sleep(0.05)
        self._last_update = issued
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.ca.name)
             .last_update(issued)
             .next_update(now + dt.timedelta(days=days)))
        for name in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(
                    self.issued[name].serial_number).revocation_date(now).build())
        data = b"not a CRL\n" if junk else b.sign(self.ca.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)
        time.sleep(0.05)  # a new mtime even on coarse clocks
        (self.tmp / "crl.new").write_bytes(data)
        os.replace(self.tmp / "crl.new", self.crl)

    def refused(self, client: str) -> bool:
        return refused(self.files, self.port, client)

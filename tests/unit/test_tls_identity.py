"""Issue 9 point 6 (TLS identity includes the CA) and point 7 (worker environment):
the pure parts -- rule matching on issuer, identity keys, which CA a chain belongs to,
escaping of names in logs, the environment a worker gets."""

from __future__ import annotations

import logging
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.adversarial.tls_pki import Authority
from tests.softhsm import MODULE

from p11gate.backends.worker_env import worker_environment
from p11gate.config import ConfigError, parse_config
from p11gate.identity import Identity
from p11gate.logs import TextFormatter
from p11gate.policy import Policy
from p11gate.policy.config import RuleConfig
from p11gate.remote.client_cas import ClientCAs
from p11gate.remote.tls import peer_identity
from p11gate.textsafe import one_line

CA_A, CA_B = "CN=Clients CA A,O=Example", "CN=Clients CA B,O=Example"
TOKENS = ["t"]


def cert_id(subject: str, ca: int, sans: tuple[str, ...] = ()) -> Identity:
    issuer = (CA_A, CA_B)[ca]
    return Identity("tls", subject=subject, sans=sans, issuer=issuer,
                    ca_id=f"sha256:{'ab'[ca] * 32}", ca_index=ca)


def rule(**kw: object) -> RuleConfig:
    return RuleConfig.model_validate({"tokens": TOKENS, **kw})


def granted(r: RuleConfig, ident: Identity) -> bool:
    return "t" in Policy([r]).grants_for(ident, TOKENS)


def test_a_rule_without_issuer_matches_only_the_first_cas_certificates() -> None:
    r = rule(name="a", subject=["CN=app-a,O=Example"], san=["DNS:app-a.example"])
    assert granted(r, cert_id("CN=app-a,O=Example", 0))
    assert not granted(r, cert_id("CN=app-a,O=Example", 1))
    assert not granted(r, cert_id("CN=x", 1, sans=("DNS:app-a.example",)))
    # an identity whose CA is unknown matches nothing that is confined to a CA
    assert not granted(r, Identity("tls", subject="CN=app-a,O=Example"))


def test_issuer_selects_the_ca_exactly_or_by_pattern_and_alone_means_all_its_clients() -> None:
    exact = rule(name="b", issuer=CA_B, subject=["CN=app-b,*"])
    assert granted(exact, cert_id("CN=app-b,O=Example", 1))
    assert not granted(exact, cert_id("CN=app-b,O=Example", 0))
    assert not granted(exact, cert_id("CN=other,O=Example", 1))  # issuer AND subject
    both = rule(name="ab", issuer=["CN=Clients CA *"], subject=["CN=app,*"])
    assert granted(both, cert_id("CN=app,O=Example", 0))
    assert granted(both, cert_id("CN=app,O=Example", 1))
    only = rule(name="all-b", issuer=[CA_B])
    assert granted(only, cert_id("CN=anyone", 1)) and not granted(only, cert_id("CN=x", 0))
    assert not granted(only, Identity("unix", uid=0, gid=0))
    everyone = rule(name="e", everyone=True)
    assert granted(everyone, cert_id("CN=x", 1))


def test_issuer_values_are_checked_and_written_as_certificate_names_are() -> None:
    assert rule(name="n", issuer="CN=Clients CA B,O=Example").issuer == [CA_B]
    for bad in ("Clients CA B", "CN=A, O=B", "", "*", "*CA B*"):
        with pytest.raises(ValueError, match="issuer"):
            rule(name="n", issuer=[bad])
    # an issuer alone selects someone
    assert rule(name="n", issuer=[CA_B]).issuer == [CA_B]


def test_identity_keys_keep_the_first_ca_and_tell_the_others_apart() -> None:
    a, b = cert_id("CN=app,O=Example", 0), cert_id("CN=app,O=Example", 1)
    assert a.key == "cert:CN=app,O=Example"  # as configs had it before several CAs
    assert b.key == f"cert:sha256:{'b' * 32}/CN=app,O=Example"
    assert a.key != b.key
    assert Identity("unix", uid=7).key == "uid:7"


def test_descriptions_escape_control_characters_and_name_the_ca_first() -> None:
    evil = cert_id("CN=x\ninfo    forged\r\x1b[2J\u2028", 1)
    d = evil.describe()
    assert "\n" not in d and "\r" not in d and "\x1b" not in d and "\u2028" not in d
    assert d == "ca=CN=Clients CA B,O=Example cert=CN=x\\ninfo    forged\\r\\x1b[2J\\u2028"
    assert one_line("é 日本 plain") == "é 日本 plain"


def test_text_log_records_are_one_line_whatever_the_message_and_fields_hold() -> None:
    fmt = TextFormatter()
    rec = logging.LogRecord("p11gate.t", logging.INFO, "", 0, "got %s", ("a\nb",), None)
    rec.peer = "cert=CN=x\nwarning p11gate.x: forged"
    rec.__dict__["odd\nkey"] = 1
    out = fmt.format(rec)
    assert "\n" not in out
    assert out == ("info    p11gate.t: got a\\nb peer=cert=CN=x\\nwarning p11gate.x: forged "
                   "odd\\nkey=1")
    try:
        raise ValueError("bad\nwarning p11gate.x: forged")
    except ValueError:
        rec = logging.LogRecord("p11gate.t", logging.ERROR, "", 0, "boom", (),
                                sys.exc_info())
    lines = fmt.format(rec).splitlines()
    assert lines[0] == "error   p11gate.t: boom"
    # a traceback's lines are indented: none can pass for a record
    assert all(ln.startswith("    ") for ln in lines[1:]) and len(lines) > 2


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def test_the_ca_of_a_chain_is_its_first_certificate_listed_in_client_ca() -> None:
    a, b = Authority("Clients CA A"), Authority("Clients CA B")
    b_sub = Authority("Clients CA B sub", parent=b)
    leaf_a, _ = a.issue("app")
    leaf_sub, _ = b_sub.issue("app")
    cas = ClientCAs([a.cert, b.cert])
    assert [c.index for c in cas.cas] == [0, 1]
    assert cas.of_chain([_der(leaf_a), _der(a.cert)]) == cas.cas[0]
    # an intermediate the client sent (not listed): the listed root above it
    assert cas.of_chain([_der(leaf_sub), _der(b_sub.cert), _der(b.cert)]) == cas.cas[1]
    # the intermediate listed too: it is the CA (the most specific one listed)
    with_sub = ClientCAs([a.cert, b.cert, b_sub.cert])
    assert with_sub.of_chain([_der(leaf_sub), _der(b_sub.cert), _der(b.cert)]).index == 2
    assert cas.of_chain([_der(leaf_a)]) is None


def test_without_a_verified_chain_the_issuer_must_have_signed_the_certificate() -> None:
    a, b = Authority("Clients CA A"), Authority("Clients CA B")
    impostor = Authority("Clients CA B")  # CA B's name, another key
    leaf_b, _ = b.issue("app")
    leaf_impostor, _ = impostor.issue("app")
    cas = ClientCAs([a.cert, b.cert])
    assert cas.issuer_of(leaf_b) == cas.cas[1]
    assert cas.issuer_of(leaf_impostor) is None
    # a CA certificate listed twice (re-issued with the same key) is one CA
    assert len(ClientCAs([a.cert, a.cert, b.cert]).cas) == 2


class _NoChain:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def test_a_certificate_whose_ca_cannot_be_told_has_no_identity() -> None:
    a, other = Authority("Clients CA A"), Authority("Other CA")
    leaf, _ = other.issue("app")
    # no CAs registered for the context: fail closed
    assert peer_identity(_NoChain(_der(leaf)), None) is None  # type: ignore[arg-type]
    # no chain from the ssl object and not issued by a listed CA: fail closed
    assert peer_identity(_NoChain(_der(leaf)), None, ClientCAs([a.cert])) is None  # type: ignore[arg-type]
    good, _ = a.issue("app")
    ident = peer_identity(_NoChain(_der(good)), None, ClientCAs([a.cert]))  # type: ignore[arg-type]
    assert ident is not None and ident.ca_index == 0 and ident.key == "cert:CN=app,O=p11gate tests"


def test_a_worker_gets_a_small_fixed_environment_and_its_backends_env() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_TIME": "C",
            "VIRTUAL_ENV": "/venv", "HSM_PIN": "secret", "LC_HSM_PIN": "secret",
            "AWS_SECRET_ACCESS_KEY": "secret", "SOFTHSM2_CONF": "/gateway/own.conf"}
    env = worker_environment({"SOFTHSM2_CONF": "/etc/softhsm2.conf"}, base)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_TIME": "C",
                   "VIRTUAL_ENV": "/venv", "SOFTHSM2_CONF": "/etc/softhsm2.conf"}


def _config(backend_env: str, pin_env: str) -> dict[str, object]:
    return {"backend": [{"name": "b", "module": MODULE, "env": {backend_env: "x"}}],
            "token": [{"name": "t", "backend": "b", "pin_mode": "none",
                       "backend_pin_env": pin_env}]}


def test_the_configuration_keeps_the_backend_pin_variable_from_workers() -> None:
    parse_config(_config("SOFTHSM2_CONF", "HSM_PIN"))
    with pytest.raises(ConfigError, match="backend_pin_env of token 't'"):
        parse_config(_config("HSM_PIN", "HSM_PIN"))
    for inherited in ("PATH", "LC_ALL", "PYTHONPATH"):
        with pytest.raises(ConfigError, match="passed on to every worker"):
            parse_config(_config("SOFTHSM2_CONF", inherited))

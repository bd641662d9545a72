"""Policy rules, namespaces, PIN hashes and throttling, audit records: pure logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p11gate.audit import AuditLog
from p11gate.codec import ckr
from p11gate.config import ConfigError, parse_config
from p11gate.frontend import pins
from p11gate.frontend.pins import MappedPins, PinThrottle, hash_pin, valid_hash, verify_pin
from p11gate.identity import Identity
from p11gate.policy import Denied, Policy, require
from p11gate.policy.config import RuleConfig
from p11gate.policy.namespace import OwnershipStore
from p11gate.registry import Registry

TOKENS = ["shared", "vault", "hsm"]
ALICE = Identity("unix", uid=1001, gid=100, pid=7)
BOB = Identity("unix", uid=1002, gid=200, pid=8)
APP = Identity("tls", subject="CN=app1,O=Example", sans=("DNS:app1.team-a.example",),
               issuer="CN=Clients CA A,O=Example", ca_id="sha256:" + "a" * 32, ca_index=0)


def rule(**kw: object) -> RuleConfig:
    return RuleConfig.model_validate(kw)


def test_no_rules_means_every_identity_is_an_officer_everywhere() -> None:
    g = Policy([]).grants_for(ALICE, TOKENS)
    assert set(g) == set(TOKENS)
    assert all(x.may("so") and not x.write_protected for x in g.values())


def test_first_matching_rule_decides_per_token_and_unnamed_tokens_are_unseen() -> None:
    p = Policy([
        rule(name="ro-shared", uid=[1001], tokens=["shared"], role="readonly"),
        rule(name="team", gid=[100], tokens=["shared", "vault"], role="user"),
        rule(name="certs", subject=["CN=app*,O=Example"], tokens=["*"], role="officer"),
    ])
    g = p.grants_for(ALICE, TOKENS)
    assert set(g) == {"shared", "vault"}
    assert g["shared"].rule == "ro-shared" and g["shared"].write_protected
    assert g["vault"].rule == "team" and g["vault"].may("create")
    assert p.grants_for(BOB, TOKENS) == {}
    assert set(p.grants_for(APP, TOKENS)) == set(TOKENS)
    assert p.grants_for(Identity("tls", subject="CN=other,O=Example"), TOKENS) == {}


def test_san_patterns_and_everyone() -> None:
    p = Policy([rule(name="san", san=["DNS:*.team-a.example"], tokens=["hsm"]),
                rule(name="all", everyone=True, tokens=["shared"], role="readonly")])
    assert set(p.grants_for(APP, TOKENS)) == {"hsm", "shared"}
    assert set(p.grants_for(BOB, TOKENS)) == {"shared"}
    # a unix identity never matches certificate patterns, and vice versa
    assert "hsm" not in p.grants_for(Identity("unix", uid=0, gid=0), TOKENS)


def test_explicit_permissions_replace_the_role() -> None:
    g = Policy([rule(name="x", uid=1001, tokens="shared", role="officer",
                     allow=["use", "create"])]).grants_for(ALICE, TOKENS)["shared"]
    assert g.may("create") and not g.may("destroy") and not g.may("so")
    assert not g.write_protected
    with pytest.raises(Denied) as e:
        require(g, "destroy", "destroying", "shared")
    assert e.value.rv == ckr.ACTION_PROHIBITED and e.value.rule == "x"


def test_denials_use_the_closest_pkcs11_codes() -> None:
    ro = Policy([rule(name="ro", uid=1001, tokens="shared", role="readonly")]).grants_for(
        ALICE, TOKENS)["shared"]
    for perm in ("create", "destroy", "modify"):
        with pytest.raises(Denied) as e:
            require(ro, perm, perm)
        assert e.value.rv == ckr.TOKEN_WRITE_PROTECTED
    with pytest.raises(Denied) as e:
        require(ro, "so", "C_InitToken")
    assert e.value.rv == ckr.ACTION_PROHIBITED
    require(ro, "use", "key use")  # allowed: no exception


def test_namespace_prefixes() -> None:
    g = Policy([rule(name="ns", uid=1001, tokens="shared",
                     namespace={"id_prefix": "a1", "label_prefix": "team-a/"})]).grants_for(
        ALICE, TOKENS)["shared"]
    ns = g.namespace
    assert ns is not None and not ns.owned
    assert ns.prefix_match(b"\xa1\x02", b"x")
    assert ns.prefix_match(b"\x01", b"team-a/key")
    assert not ns.prefix_match(b"\x01", b"team-b/key")


def test_rule_configuration_errors_are_explained(tmp_path: Path) -> None:
    base = {"backend": [{"name": "b", "module": "/bin/sh"}],
            "token": [{"name": "shared", "backend": "b"}]}
    with pytest.raises(ConfigError, match="matches nobody"):
        parse_config({**base, "rule": [{"name": "r", "tokens": ["shared"]}]}, "f.toml")
    with pytest.raises(ConfigError, match="no token named 'nope'"):
        parse_config({**base, "rule": [{"name": "r", "uid": 1, "tokens": ["nope"]}]}, "f.toml")
    with pytest.raises(ConfigError, match="rule names must be unique"):
        parse_config({**base, "rule": [{"name": "r", "uid": 1, "tokens": ["shared"]}] * 2})
    with pytest.raises(ConfigError, match="hex digits"):
        parse_config({**base, "rule": [{"name": "r", "uid": 1, "tokens": ["shared"],
                                        "namespace": {"id_prefix": "zz"}}]})
    with pytest.raises(ConfigError, match=r"f.toml: rule\[0\].role"):
        parse_config({**base, "rule": [{"name": "r", "uid": 1, "tokens": ["shared"],
                                        "role": "admin"}]}, "f.toml")


def test_pin_mode_configuration_errors(tmp_path: Path) -> None:
    def cfg(**token: object) -> dict[str, object]:
        return {"backend": [{"name": "b", "module": "/bin/sh"}],
                "token": [{"name": "t", "backend": "b", **token}]}

    with pytest.raises(ConfigError, match="needs backend_pin_file or backend_pin_env"):
        parse_config(cfg(pin_mode="mapped"))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(cfg(pin_mode="none", backend_pin_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="hash-pin"):
        parse_config(cfg(pin_mode="mapped", backend_pin_env="X", pins={"uid:1": "1234"}))
    with pytest.raises(ConfigError, match="for pin_mode 'mapped' or 'none'"):
        parse_config(cfg(backend_pin_env="X"))
    pin_file = tmp_path / "pin"
    pin_file.write_text("s3cret\n")
    c = parse_config(cfg(pin_mode="none", backend_pin_file=str(pin_file)))
    assert c.token[0].backend_pin() == b"s3cret"
    c = parse_config(cfg(pin_mode="none", backend_pin_env="P11GATE_TEST_UNSET_VAR"))
    with pytest.raises(ConfigError, match="P11GATE_TEST_UNSET_VAR"):
        c.token[0].backend_pin()


def test_pin_hashes_are_salted_scrypt() -> None:
    h1, h2 = hash_pin(b"1234"), hash_pin(b"1234")
    assert h1 != h2 and valid_hash(h1) and h1.startswith("scrypt$16384$8$1$")
    assert verify_pin(b"1234", h1) and verify_pin(b"1234", h2)
    assert not verify_pin(b"1235", h1)
    assert not verify_pin(b"1234", "scrypt$bad") and not valid_hash("1234")
    assert "1234" not in h1


def test_throttle_locks_out_and_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(pins.time, "monotonic", lambda: now[0])
    t = PinThrottle(max_failures=3, lockout=10.0)
    for _ in range(2):
        t.failed("uid:1")
    assert t.locked_for("uid:1") == 0
    t.failed("uid:1")
    assert t.locked_for("uid:1") == 10.0
    assert t.locked_for("uid:2") == 0  # per identity
    now[0] += 10.5
    assert t.locked_for("uid:1") == 0
    for _ in range(3):
        t.failed("uid:1")
    assert t.locked_for("uid:1") == 20.0  # doubled
    t.succeeded("uid:1")
    assert t.locked_for("uid:1") == 0


def test_mapped_pin_overrides_survive_restarts_but_yield_to_a_new_configured_hash(
    tmp_path: Path,
) -> None:
    old = hash_pin(b"first")
    reg = Registry(tmp_path)
    book = MappedPins("t", {"uid:1": old}, reg)
    changed = hash_pin(b"second")
    book.set("uid:1", changed)
    assert book.get("uid:1") == changed
    reg.close()
    reg = Registry(tmp_path)
    assert MappedPins("t", {"uid:1": old}, reg).get("uid:1") == changed
    newer = hash_pin(b"operator")
    assert MappedPins("t", {"uid:1": newer}, reg).get("uid:1") == newer
    assert MappedPins("t", {}, reg).get("uid:2") is None


def test_ownership_persists_in_the_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    store = OwnershipStore(reg)
    key = (3, b"\x01", b"k")
    store.claim("shared", key, "uid:1001")
    reg.close()
    store = OwnershipStore(Registry(tmp_path))
    assert store.owner("shared", key) == "uid:1001"
    assert store.owner("other", key) is None
    store.release("shared", key)
    assert store.owner("shared", key) is None


def test_audit_records_are_json_lines_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "a" / "audit.jsonl"
    log = AuditLog(str(path))
    log.record("C_SignInit", 0, "uid=1 gid=1 pid=2", "shared",
               object={"class": "private_key", "id": "01"}, mechanism="0x1041")
    log.record("C_Login", ckr.PIN_INCORRECT, "uid=1 gid=1 pid=2", "shared")
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["op"] for r in lines] == ["C_SignInit", "C_Login"]
    assert lines[1]["result"] == "CKR_PIN_INCORRECT"
    assert lines[0]["object"]["id"] == "01" and lines[0]["time"].endswith("Z")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    AuditLog(None).record("C_Login", 0, "x")  # disabled: no file, no error


@pytest.mark.parametrize(("subject", "pattern", "matches"), [
    # a value's escaped separators never pass for the pattern's (fourth review)
    (r"CN=evil\,O=Team A", "CN=*,O=Team A", False),
    (r"CN=evil\,O=Team A", "*,O=Team A", False),
    (r"CN=a\+O=Team A", "CN=a+O=Team A", False),
    (r"CN=x\\,O=Team A", "CN=x?,O=Team A", True),  # '?' takes one whole escape
    (r"CN=x\\,O=Team A", "CN=x??,O=Team A", False),
    ("CN=x,O=Team A", "CN=*,O=Team A", True),
    ("CN=a,CN=b,O=Team A", "CN=*,O=Team A", True),  # '*' crosses real separators
    ("CN=tenant-a+O=Team A", "CN=tenant-a,O=Team A", False),  # a multi-valued RDN
    (r"CN=Smith\, John,O=Team A", r"CN=Smith\, John,O=Team A", True),
    (r"CN=Smith\, John,O=Team A", "CN=Smith*,O=Team A", True),
])
def test_subject_patterns_and_rfc4514_escapes(subject: str, pattern: str,
                                              matches: bool) -> None:
    ident = Identity("tls", subject=subject, issuer="CN=CA", ca_id="sha256:" + "b" * 32,
                     ca_index=0)
    grants = Policy([rule(name="r", subject=[pattern], tokens=["shared"])]).grants_for(
        ident, TOKENS)
    assert ("shared" in grants) is matches

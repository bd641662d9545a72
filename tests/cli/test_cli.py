"""The command line: configuration errors are clear, demo mode serves a working token,
secrets never reach the logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gateway_proc import CLIENT_MODULE, Gateway, write_config
from tests.softhsm import MODULE, make_token


def p11gate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "token 'signing'" in r.stdout and "OK" in r.stdout


def test_check_config_names_file_key_and_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        f"""
[[backend]]
name = "softhsm"
module = "{MODULE}"
isolaton = "process"

[[token]]
name = "signing"
backend = "sofhsm"
"""
    )
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}: backend[0].isolaton: unknown key" in r.stderr
    r = p11gate("check-config", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr
    cfg.write_text(cfg.read_text().replace("isolaton", "isolation"))
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert "no backend or pool named 'sofhsm' (defined: softhsm)" in r.stderr
    cfg.write_text('[[backend]]\nname="a"\nmodule="/nonexistent/x.so"\n'
                   '[[token]]\nname="t"\nbackend="a"\n')
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert "backend[0].module" in r.stderr and "does not exist" in r.stderr
    cfg.write_text("this is not toml = = =")
    r = p11gate("check-config", "--config", str(cfg))
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_demo_mode_serves_the_soft_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p11gate.cli", "serve", "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("P11_KIT_SERVER_ADDRESS=unix:path="), line
        address = line.split("=", 1)[1].split(";", 1)[0]
        env = {**os.environ, "P11_KIT_SERVER_ADDRESS": address}
        r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "-L"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "token label        : demo" in r.stdout
        r = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "-O", "--login",
                            "--pin", "1234"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert "Private Key Object; EC" in r.stdout and "Private Key Object; RSA" in r.stdout
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert (state / "demo-token.db").exists() and not (state / "softhsm2.conf").exists()
    assert not (state / "p11gate.sock").exists(), "socket left behind after SIGTERM"


CLIENT_SCRIPT = f"""
import sys, pkcs11
from pkcs11 import Mechanism, ObjectClass, Attribute, KeyType
pin = sys.argv[1]
tok = pkcs11.lib("{CLIENT_MODULE}").get_token(token_label="signing")
try:
    tok.open(user_pin="Zq7-wrong-3uTn")
    raise SystemExit("wrong PIN accepted")
except pkcs11.PinIncorrect:
    pass
with tok.open(user_pin=pin) as s:
    key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\\x01")
    sig = key.sign(b"Zq7-data-to-sign-0123456789abcde", mechanism=Mechanism.ECDSA)
    k = s.generate_key(KeyType.AES, 128, label="exportable",
                       template={{Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}})
    print(sig.hex(), k[Attribute.VALUE].hex())
"""


def test_pins_and_key_material_never_reach_the_logs(tmp_path: Path) -> None:
    pin = "Zq7-pin-7wXk"
    token = make_token(tmp_path, label="secret", pin=pin, so_pin="Zq7-so-8vYm")
    cfg = write_config(tmp_path, token, isolation="process")
    cfg.write_text(cfg.read_text().replace('log_format = "json"',
                                           'log_format = "json"\nlog_level = "debug"'))
    gw = Gateway(cfg)
    try:
        # the client runs in its own process: python-pkcs11 loads a module once per process
        r = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, pin], env=gw.client_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        sig_hex, value_hex = r.stdout.split()
        sig, value = bytes.fromhex(sig_hex), bytes.fromhex(value_hex)
    finally:
        gw.stop()
    log = gw.log()
    assert "login" in log  # the log did record the logins
    for needle in (pin, "Zq7-wrong-3uTn", "Zq7-so-8vYm", "Zq7-data"):
        assert needle not in log
        assert needle.encode().hex() not in log
    for blob in (sig, value):
        assert blob.hex() not in log and repr(blob) not in log


def test_status_reports_tokens_and_backends_over_a_private_admin_socket(tmp_path: Path) -> None:
    import json
    import stat

    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    r = p11gate("status", "--config", str(cfg))
    assert r.returncode == 1 and "cannot reach the gateway" in r.stderr
    gw = Gateway(cfg)
    try:
        admin = tmp_path / "state" / "admin.sock"
        assert stat.S_IMODE(admin.stat().st_mode) == 0o600
        r = p11gate("status", "--json", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert [t["name"] for t in st["tokens"]] == ["signing"]
        assert st["tokens"][0]["present"] is True
        assert st["backends"][0]["name"] == "softhsm" and st["backends"][0]["up"] is True
        assert token["pin"] not in r.stdout
    finally:
        gw.stop()
    assert not admin.exists()

"""Status people can read, and the names and files PKCS#11 tools expect (issue 12, 6-7):
`status` as a table (slot ids in hex as pkcs11-tool prints them, URIs as p11tool prints
them), `top` driven in tmux, token selection by PKCS#11 URI, `module-file --install`
seen by p11tool through p11-kit-proxy.so, and `check-config`'s report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.gateway_proc import CLIENT_MODULE, Gateway, wait_for, write_config
from tests.softhsm import make_token

from p11gate.config import ConfigError, parse_config
from p11gate.config_select import TokenSelect
from p11gate.pkcs11_uri import format_token_uri, parse_token_uri

PROXY_MODULE = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"


def p11gate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11gate.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def signing_loop(env: dict[str, str], tmp: Path, stop: threading.Event) -> None:
    """pkcs11-tool signing with key 01 through the gateway, again and again."""
    (tmp / "digest").write_bytes(b"\x11" * 32)
    while not stop.is_set():
        subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "--login", "--pin", "1234",
                        "--sign", "--mechanism", "ECDSA", "--id", "01",
                        "-i", str(tmp / "digest"), "-o", str(tmp / "sig")],
                       env=env, capture_output=True, timeout=60)


# ---------------------------------------------------------------- URIs, no gateway


def test_uri_parsing_percent_decodes_and_refuses_what_it_does_not_know() -> None:
    got = parse_token_uri("pkcs11:token=my%20token%3Bx;manufacturer=SoftHSM%20project;"
                          "serial=0123abcd;model=SoftHSM%20v2;slot-id=42")
    assert got == {"label": "my token;x", "manufacturer": "SoftHSM project",
                   "serial": "0123abcd", "model": "SoftHSM v2", "slot_id": 42}
    # what the gateway prints parses back to the same names
    uri = format_token_uri("a b;c", manufacturer="M%", model="m", serial="s")
    assert uri == "pkcs11:model=m;manufacturer=M%25;serial=s;token=a%20b%3Bc"
    assert parse_token_uri(uri)["label"] == "a b;c"
    for bad, says in [("pkcs11:object=key1", "'object' does not name a token"),
                      ("pkcs11:token=a?pin-value=1234", "query attributes (pin-value)"),
                      ("pkcs11:token=a;token=b", "given twice"),
                      ("pkcs11:slot-id=0x1", "decimal"),
                      ("pkcs11:", "names no token attribute"),
                      ("token=a", "starts with 'pkcs11:'"),
                      ("pkcs11:token=%ff", "not UTF-8")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_token_uri(bad)
    sel = TokenSelect.model_validate("pkcs11:token=anchor;serial=abc")
    assert (sel.label, sel.serial, sel.uri) == ("anchor", "abc", "pkcs11:token=anchor;serial=abc")
    info = [b"anchor".ljust(32), b"SoftHSM project".ljust(32), b"SoftHSM v2".ljust(16),
            b"abc".ljust(16)]
    assert sel.matches(7, info)
    assert not TokenSelect.model_validate("pkcs11:token=anchor;serial=abd").matches(7, info)
    assert not TokenSelect.model_validate("pkcs11:token=anchor;slot-id=8").matches(7, info)


def test_config_reports_a_bad_uri_and_every_reference_error_in_one_run() -> None:
    raw: dict[str, Any] = {
        "backend": [{"name": "b", "module": "/usr/lib/softhsm/libsofthsm2.so"}],
        "token": [{"name": "t", "backend": "b", "select": "pkcs11:token=t;color=blue"}]}
    with pytest.raises(ConfigError, match=r"token\[0\]\.select: .*'color' does not name a "
                                          r"token \(known: token, manufacturer, serial"):
        parse_config(raw, "gw.toml")
    raw["token"] = [{"name": "t", "backend": "nope"}, {"name": "t", "backend": "b"},
                    {"name": "u", "backend": "b", "select": {"manufacturer": "x"}}]
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "gw.toml")
    assert "token[2].select" in str(e.value) and "PKCS#11 URI" in str(e.value)
    del raw["token"][2]
    raw["rule"] = [{"name": "r", "uid": 1, "tokens": ["ghost"]},
                   {"name": "r", "uid": 2, "tokens": ["t"]}]
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "gw.toml")
    lines = str(e.value).splitlines()
    # each problem on its own line, all of them in one run, duplicates named
    assert any("token[0].backend: no backend or pool named 'nope'" in li for li in lines)
    assert any("token names must be unique: ['t']" in li for li in lines)
    assert any("no token named 'ghost'" in li for li in lines)
    assert any("rule names must be unique" in li and "['r']" in li for li in lines)
    assert all(li.startswith("gw.toml: ") for li in lines)


# ---------------------------------------------------------------- with a gateway


def two_token_config(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """One SoftHSM configuration with tokens "anchor" and "other"; the gateway's token
    "signing" is "anchor" chosen by URI (label and serial)."""
    tok = make_token(tmp_path, keys=True)
    other = make_token(tmp_path, keys=False, label="other")
    cfg = write_config(tmp_path, tok)
    uri = f"pkcs11:token={tok['label']};serial={tok['serial']}"
    text = cfg.read_text().replace(f'select = {{ label = "{tok["label"]}" }}',
                                   f'select = "{uri}"')
    assert uri in text
    cfg.write_text(text)
    return cfg, tok, other


def test_status_table_uri_select_and_check_config(tmp_path: Path) -> None:
    cfg, tok, other = two_token_config(tmp_path)
    r = p11gate("check-config", str(cfg))  # the path as an argument
    assert r.returncode == 0, r.stderr
    assert f"listeners:\n  unix:path={tmp_path / 'p11gate.sock'}" in r.stdout
    assert "    uri pkcs11:token=signing" in r.stdout
    assert "rules: none" in r.stdout
    gw = Gateway(cfg)
    try:
        env = gw.client_env()
        listing = subprocess.run(["pkcs11-tool", "--module", CLIENT_MODULE, "-L"], env=env,
                                 capture_output=True, text=True, timeout=60).stdout
        # the URI picked "anchor" (its serial), not "other"
        assert f"serial num         : {tok['serial']}" in listing
        assert other["serial"] not in listing
        pkcs11_slot = re.search(r"Slot 0 \((0x[0-9a-f]+)\): p11gate signing", listing)
        assert pkcs11_slot, listing
        p11tool = subprocess.run(["p11tool", "--provider", CLIENT_MODULE, "--list-tokens"],
                                 env=env, capture_output=True, text=True, timeout=60).stdout
        tool_uri = re.search(r"URL: (pkcs11:\S*token=signing)", p11tool)
        assert tool_uri, p11tool
        stop = threading.Event()
        loop = threading.Thread(target=signing_loop, args=(env, tmp_path, stop))
        loop.start()
        try:
            assert wait_for(lambda: json.loads(p11gate("status", "--json", "--config",
                                                       str(cfg)).stdout)
                            ["tokens"][0]["stats"]["calls"] >= 20, timeout=60)
        finally:
            stop.set()
            loop.join()
        r = p11gate("status", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        text = r.stdout
        assert text.startswith("p11gate 0.1.0  pid ")
        assert re.search(r"  up \d+m \d\ds \(since ", text)
        assert f"listeners: unix:path={tmp_path / 'p11gate.sock'}" in text
        row = next(li for li in text.splitlines() if li.startswith("  signing "))
        # the slot as pkcs11-tool shows it, the URI as p11tool shows it
        cols = row.split()
        assert cols[1] == pkcs11_slot.group(1) and cols[2] == "present"
        assert cols[-1] == tool_uri.group(1), (row, p11tool)
        assert int(cols[6]) >= 20 and cols[7] == "0"  # calls, errors
        assert re.search(r"^  softhsm +up +process +\d+ +0 +-$", text, re.M), text
        assert "limits hit: none" in text
        st = json.loads(p11gate("status", "--json", "--config", str(cfg)).stdout)
        assert st["version"] == "0.1.0" and st["uptime_s"] > 0
        assert st["listeners"] == [f"unix:path={tmp_path / 'p11gate.sock'}"]
        t = st["tokens"][0]
        assert t["slot_hex"] == pkcs11_slot.group(1) and t["uri"] == tool_uri.group(1)
        assert t["stats"]["latency_total_s"] > 0
    finally:
        gw.stop()


def test_select_uri_that_matches_nothing_leaves_the_token_absent(tmp_path: Path) -> None:
    cfg, tok, _ = two_token_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(f"serial={tok['serial']}", "serial=ffff0000"))
    gw = Gateway(cfg)
    try:
        st = json.loads(p11gate("status", "--json", "--config", str(cfg)).stdout)
        assert st["tokens"][0]["present"] is False
        assert "no token matches pkcs11:token=anchor;serial=ffff0000" in \
            st["tokens"][0]["last_error"]
        text = p11gate("status", "--config", str(cfg)).stdout
        assert "  signing: " in text and "no token matches" in text
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def module_dir_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/remote/p11kit_dirs.c as a preload library: p11-kit reads module files
    only from $P11GATE_TEST_MODULE_DIR."""
    out = tmp_path_factory.mktemp("shim") / "p11kit_dirs.so"
    src = Path(__file__).parents[1] / "remote" / "p11kit_dirs.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(src),
                    str(Path(PROXY_MODULE).resolve())], check=True, timeout=120)
    return out


def test_module_file_install_makes_p11tool_list_the_token(tmp_path: Path,
                                                         module_dir_shim: Path) -> None:
    token = make_token(tmp_path, keys=False)
    cfg = write_config(tmp_path, token)
    modules = tmp_path / "modules"
    modules.mkdir()
    r = p11gate("module-file", "--config", str(cfg))
    assert r.stdout.endswith(f"\nremote: unix:path={tmp_path / 'p11gate.sock'}\n"), r.stdout
    r = p11gate("module-file", "--config", str(cfg), "--install", "--path", str(modules))
    assert r.returncode == 0, r.stderr
    written = modules / "p11gate.module"
    assert r.stdout.strip() == f"wrote {written}" and oct(written.stat().st_mode)[-3:] == "644"
    env = {k: v for k, v in os.environ.items() if k != "P11_KIT_SERVER_ADDRESS"}
    env |= {"LD_PRELOAD": str(module_dir_shim), "P11GATE_TEST_MODULE_DIR": str(modules)}
    gw = Gateway(cfg)
    try:
        # p11tool loads p11-kit-proxy's registered modules: the file is all it needs
        out = subprocess.run(["p11tool", "--list-tokens"], env=env, capture_output=True,
                             text=True, timeout=60).stdout
        assert re.search(r"URL: pkcs11:\S*token=signing", out), out
    finally:
        gw.stop()
    # the tunnel form: the tunnel command with its certificate options and gateways
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    r = p11gate("module-file", "--tunnel", "tls:gw1:8443", "--tunnel", "tls:gw2:8443",
                "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"),
                "--ca", str(tmp_path / "ca.pem"))
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[-1]
    assert re.fullmatch(rf"remote: \|/\S+/p11gate tunnel --cert {tmp_path}/c.pem --key "
                        rf"{tmp_path}/k.pem --ca {tmp_path}/ca.pem tls:gw1:8443 "
                        r"tls:gw2:8443", line), line
    r = p11gate("module-file", "--tunnel", "gw1:8443")
    assert r.returncode == 2 and "tls:HOST:PORT" in r.stderr


def test_top_in_tmux_shows_the_call_rate_while_a_client_signs(tmp_path: Path) -> None:
    assert shutil.which("tmux"), "tmux is installed by scripts/install-deps.sh"
    token = make_token(tmp_path, keys=True)
    cfg = write_config(tmp_path, token)
    gw = Gateway(cfg)
    session = f"p11gate-top-{os.getpid()}"
    tmux = ["tmux", "-L", session, "-f", "/dev/null"]  # a server of its own, no user config
    stop = threading.Event()
    loop = threading.Thread(target=signing_loop, args=(gw.client_env(), tmp_path, stop))
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "30",
                        # rich would take an inherited COLUMNS over the pane's real width
                        f"env -u COLUMNS -u LINES {sys.executable} -m p11gate.cli top "
                        f"--config {cfg}"],
                       check=True, timeout=30)
        loop.start()

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, timeout=30).stdout

        def rate() -> float:
            for li in screen().splitlines():
                if "signing" in li:
                    cells = [c.strip() for c in li.split("│")]
                    try:
                        return float(cells[3])
                    except (IndexError, ValueError):
                        return 0.0
            return 0.0

        assert wait_for(lambda: rate() > 0, timeout=60), screen()
        text = screen()
        assert "TOKEN" in text and "CALLS/S" in text and "LATENCY" in text
        assert "softhsm up" in text and re.search(r"\d+\.\d\d ms", text), text
    finally:
        stop.set()
        if loop.is_alive():
            loop.join()
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
        gw.stop()

"""What a reload keeps from the running configuration: settings bound to sockets and
files opened at start, and running back ends whose definition changed."""

from __future__ import annotations

from typing import Any

from p11gate.config import Config, parse_config
from p11gate.reload import keep_restart_only


def conf(server: dict[str, Any] | None = None, timeout: float = 30.0,
         extra: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {
        "server": {"listen": "unix:path=/run/a.sock", "state_dir": "/tmp/x", **(server or {})},
        "backend": [{"name": "a", "module": "/bin/sh", "call_timeout": timeout}],
        "token": [{"name": "t", "backend": "a"}], **(extra or {})}
    return parse_config(raw, "new.toml")


def test_listen_and_state_dir_keep_their_running_values_with_a_warning() -> None:
    old = conf()
    new = conf({"listen": "unix:path=/run/b.sock", "state_dir": "/tmp/y",
                "max_connections": 7, "log_level": "debug"})
    merged, warnings = keep_restart_only(old, new)
    assert merged.server.listen == ["unix:path=/run/a.sock"]
    assert merged.server.state_dir == "/tmp/x"
    # the reloadable keys of the same section are applied
    assert (merged.server.max_connections, merged.server.log_level) == (7, "debug")
    assert len(warnings) == 2
    assert "server.listen changed: needs a restart" in warnings[0]
    assert "server.state_dir changed" in warnings[1]


def test_a_changed_running_backend_and_audit_section_are_kept() -> None:
    old = conf()
    new = conf(timeout=5.0, extra={"audit": {"enabled": False}})
    merged, warnings = keep_restart_only(old, new)
    assert merged.backend[0].call_timeout == 30.0
    assert merged.audit.enabled is True
    assert any("backend 'a' changed: needs a restart" in w for w in warnings)
    assert any("[audit] changed" in w for w in warnings)


def test_an_unchanged_file_warns_nothing() -> None:
    merged, warnings = keep_restart_only(conf(), conf())
    assert warnings == [] and merged == conf()

"""Reloads are audited and fail closed: a reload the audit log cannot record is not
applied. Real parts: a gateway over SoftHSM, SIGHUP and `p11gate reload`, an audit log on
a small tmpfs filled to the last byte (root: the test mounts it)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.adversarial.fail_closed_env import fill, tmpfs
from tests.gateway_proc import Gateway, RawClient, wait_for
from tests.integration.test_reload import reload_cmd, status, write
from tests.softhsm import make_token


def reloads(audit: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["op"] == "reload"]


def pad_to_page(audit: Path) -> None:
    """One record (op "pad") that ends the file on a page boundary: tmpfs gives out whole
    pages, so a full file system would still take a record in the last page's tail."""
    room = -audit.stat().st_size % 4096
    if room < 32:
        room += 4096
    head, end = '{"op":"pad","x":"', '"}\n'
    with audit.open("a") as f:
        f.write(head + "x" * (room - len(head) - len(end)) + end)
    assert audit.stat().st_size % 4096 == 0


def connected(gw: Gateway) -> int:
    return sum(r.get("msg") == "client connected" for r in gw.records())


def test_reloads_are_recorded_and_one_the_log_cannot_take_is_not_applied(
        tmp_path: Path) -> None:
    tok = make_token(tmp_path / "hsm")
    with tmpfs(tmp_path / "auditfs", "256k") as auditfs:
        audit = auditfs / "audit.jsonl"
        tail = f'[audit]\nfile = "{audit}"\nrequired = true\n'
        cfg = write(tmp_path, tok, tail=tail)
        gw = Gateway(cfg)
        try:
            # SIGHUP: a PENDING record before the change, the outcome with its changes
            write(tmp_path, tok, tail=tail, log_level="warning")
            os.kill(gw.proc.pid, signal.SIGHUP)
            assert wait_for(lambda: status(tmp_path)["reloads"] == 1, timeout=30)
            recs = reloads(audit)
            assert [r["result"] for r in recs] == ["PENDING", "CKR_OK"], recs
            assert all(r["identity"] == "SIGHUP" and r["file"] == str(cfg) for r in recs)
            assert recs[1]["changes"]["log_level"] == "warning"

            # `p11gate reload`: the requester is the admin socket's peer
            write(tmp_path, tok, tail=tail, log_level="info")
            r = reload_cmd(cfg)
            assert r.returncode == 0, r.stdout + r.stderr
            recs = reloads(audit)[2:]
            assert [x["result"] for x in recs] == ["PENDING", "CKR_OK"], recs
            who = recs[0]["identity"]
            assert who.startswith(f"admin socket uid={os.getuid()} pid="), who
            assert int(who.rsplit("pid=", 1)[1]) not in (0, gw.proc.pid)  # the CLI's
            assert recs[1]["changes"]["log_level"] == "info"

            # a refused file is recorded with its reason
            cfg.write_text(cfg.read_text()
                           + "\n[[rule]]\nname = 'x'\neveryone = true\ntokens = ['nope']\n")
            r = reload_cmd(cfg)
            assert r.returncode != 0
            refused = reloads(audit)[4:]
            assert [x["result"] for x in refused] == ["CKR_FUNCTION_FAILED"], refused
            assert "nope" in refused[0]["reason"]

            # the audit disk full: a valid new file (log level warning) is not applied
            write(tmp_path, tok, tail=tail, log_level="warning")
            pad_to_page(audit)  # no room left in the file's own last page either
            filler = fill(auditfs)
            r = reload_cmd(cfg)
            assert r.returncode != 0 and "audit log" in r.stdout + r.stderr, r.stdout
            assert status(tmp_path)["reloads"] == 2  # the two above, not this one
            assert len(reloads(audit)) == 5  # nothing could be written, nothing applied
            before = connected(gw)
            c = RawClient(gw.path)
            c.initialize()
            c.close()
            # still at info: the new connection is logged
            assert wait_for(lambda: connected(gw) == before + 1), gw.log()[-2000:]

            # room again: the same file is applied, and recorded
            filler.unlink()
            r = reload_cmd(cfg)
            assert r.returncode == 0, r.stdout + r.stderr
            assert [x["result"] for x in reloads(audit)[5:]] == ["PENDING", "CKR_OK"]
            before = connected(gw)
            c = RawClient(gw.path)
            c.initialize()
            c.close()
            assert not wait_for(lambda: connected(gw) > before, timeout=2)
        finally:
            alive = gw.alive()
            gw.stop()
        assert alive


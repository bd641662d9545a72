"""``[server] processes = N``: N gateway processes serving the same listeners.

The supervisor (the process `p11gate serve` started) binds every listener once, starts
N children, `p11gate serve` again, and accepts every connection itself: it hands each
one to the child with the fewest open connections (ties in turn) over a private socket
pair (frontend/handoff.py says why the children do not accept on the shared listener).
Each child has its own backends and workers, its own admin socket
(``<state_dir>/proc-K/admin.sock``) and lock directory; what must be one across them is
in the state store (registry, PIN attempts and lock-outs, quotas) or in one file they
all append to:

* the audit log: every record is one ``write(2)`` of a whole line to a file opened with
  ``O_APPEND``, so the records of all processes form one well-formed stream in the
  order they were written, none lost or cut;
* the log: the same stderr (or log file), one line per record.

The supervisor restarts a child that dies (its clients reconnect; new connections go to
the other children until it is back), passes SIGHUP on
(reopen logs, reload the configuration: every child re-reads the file) and SIGTERM,
and answers `p11gate status` on the usual admin socket with every child's status
summed up, each child's own under ``processes``, and ``[metrics] listen`` with every
child's samples merged (metrics_merge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from . import systemd
from .admin import AdminServer, admin_socket_path, query
from .config import Config
from .frontend.handoff import HANDOFF_ENV, Balancer, Lane, Receiver, channel_pair
from .metrics_http import MetricsServer, tls_for
from .metrics_merge import Family, families, merged_registry
from .remote.tls import parse_tls_address
from .state.sqlite import FILE_NAME
from .unix_socket import BoundSocket, SocketInUse, bind_unix, make_socket_dir

log = logging.getLogger("p11gate")

#: set in a child's environment: its index (HANDOFF_ENV: its end of the socket pair)
CHILD_ENV = "P11GATE_PROCESS"
#: a child that dies sooner than this after its start waits before the next try
RESTART_BACKOFF = (0.5, 10.0)


def child_index() -> int | None:
    value = os.environ.get(CHILD_ENV)
    return int(value) if value and value.isdigit() else None


def child_dir(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"proc-{index}")


def child_config(cfg: Config, index: int) -> Config:
    """What a child changes in the configuration: its own admin socket; the registry
    and the audit log of the supervisor's state directory (one for all); no metrics
    endpoint (the supervisor serves one for all of them, metrics_merge.py)."""
    state_dir = cfg.server.state_dir
    server = cfg.server.model_copy(update={
        "admin_socket": os.path.join(child_dir(state_dir, index), "admin.sock"),
        "processes": 1})
    update: dict[str, Any] = {"server": server}
    if cfg.state.engine == "sqlite" and not cfg.state.path:
        update["state"] = cfg.state.model_copy(
            update={"path": os.path.join(state_dir, FILE_NAME)})
    if cfg.audit.enabled and not cfg.audit.file:
        update["audit"] = cfg.audit.model_copy(
            update={"file": os.path.join(state_dir, "audit.jsonl")})
    if cfg.metrics.listen is not None:
        update["metrics"] = cfg.metrics.model_copy(update={"listen": None})
    return cfg.model_copy(update=update)


def handoff_from_supervisor(open_count: Callable[[], int]) -> Receiver | None:
    """A child's end of its socket pair with the supervisor (None: not a child)."""
    text = os.environ.pop(HANDOFF_ENV, None)
    if text is None or not text.isdigit():
        return None
    fd = int(text)
    os.set_inheritable(fd, False)  # not on to the workers
    return Receiver(socket.socket(fileno=fd), open_count)


def _settle(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)


class _Child:
    """One gateway process. Watched by its pid (waitpid), not by its pipes: the workers
    of a child killed with -9 may hold its stdout open for a while."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restarts = 0
        self.first_line: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def start(self, config_path: str, lane: Lane) -> None:
        """Starts the process with a new socket pair; the lane takes no connection
        until the process says it serves (``first_line``)."""
        loop = asyncio.get_running_loop()
        if lane.channel is not None:
            loop.remove_reader(lane.channel.fileno())
        ours, theirs = channel_pair()
        lane.reset(ours)
        env = {**os.environ, CHILD_ENV: str(self.index), HANDOFF_ENV: str(theirs.fileno())}
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(k, None)  # the supervisor speaks to systemd, not the children
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p11gate.cli", "serve", "--config", config_path],
                stdout=subprocess.PIPE, pass_fds=[theirs.fileno()], env=env)
        finally:
            theirs.close()
        loop.add_reader(ours.fileno(), self._reports, lane, ours)
        self.started = time.monotonic()
        self.first_line = loop.create_future()
        threading.Thread(target=self._read, args=(loop, self.proc, self.first_line),
                         daemon=True, name=f"p11gate-proc-{self.index}").start()

    @staticmethod
    def _read(loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes],
              first: asyncio.Future[str]) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        loop.call_soon_threadsafe(_settle, first, line)
        while proc.stdout.readline():
            pass  # the children's stdout says nothing the supervisor has not said
        proc.stdout.close()

    @staticmethod
    def _reports(lane: Lane, channel: socket.socket) -> None:
        if lane.channel is channel and not lane.read_reports():
            # the child is gone (or closed its end): no connection goes to it now
            asyncio.get_running_loop().remove_reader(channel.fileno())
            lane.ready = False

    async def wait(self) -> int:
        assert self.proc is not None
        while (rc := self.proc.poll()) is None:
            await asyncio.sleep(0.1)
        return rc


class Supervisor:
    def __init__(self, cfg: Config, config_path: str) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.count = cfg.server.process_count()
        self._bound: list[BoundSocket] = []
        #: (index in [server] listen, listening socket)
        self._socks: list[tuple[int, socket.socket]] = []
        self.balancer = Balancer(self.count)
        self.children: list[_Child] = []
        self.stopping = False
        self.admin: AdminServer | None = None
        self.metrics: MetricsServer | None = None

    def bind(self) -> None:
        inherited = systemd.inherited_sockets()
        for index, address in enumerate(self.cfg.server.listen):
            if address.startswith("tls:"):
                host, port = parse_tls_address(address)
                taken = inherited.take_tcp(host, port)
                if not taken:
                    s = socket.create_server((host, port), backlog=1024, reuse_port=True)
                    taken = [s]
                self._socks += [(index, s) for s in taken]
                continue
            path = address.removeprefix("unix:path=")
            sock = inherited.take_unix(path)
            if sock is None:
                make_socket_dir(path)
                bound = bind_unix(path, self.cfg.server.socket_mode)
                self._bound.append(bound)
                sock = bound.sock
                sock.listen(1024)
            self._socks.append((index, sock))

    def status(self) -> dict[str, Any]:
        """Every child's status, numbers summed; each one's own under ``processes``."""
        parts: list[dict[str, Any]] = []
        for c in self.children:
            path = os.path.join(child_dir(self.cfg.server.state_dir, c.index), "admin.sock")
            entry: dict[str, Any] = {"index": c.index, "restarts": c.restarts,
                                     "pid": c.proc.pid if c.proc else None}
            try:
                entry["status"] = query(path, timeout=2.0)
            except OSError as e:
                entry["error"] = e.strerror or str(e)
            parts.append(entry)
        live = [p["status"] for p in parts if "status" in p]
        total: dict[str, Any] = dict(live[0]) if live else {}
        for key in ("connections", "audit_records", "audit_failures",
                    "connections_refused", "tls_refused", "reloads", "reload_failures"):
            total[key] = sum(int(s.get(key, 0)) for s in live)
        total["clients"] = sorted({c for s in live for c in s.get("clients", [])})
        total["processes"] = parts
        return total

    async def _reload(self, requested_by: str) -> dict[str, Any]:
        """`p11gate reload`: every child reloads; ok when all did. Each child audits its
        own reload, naming this supervisor (it asked them) as the requester."""
        answers = []
        for c in self.children:
            path = os.path.join(child_dir(self.cfg.server.state_dir, c.index), "admin.sock")
            try:
                answers.append(await asyncio.to_thread(query, path, "reload", 60.0))
            except OSError as e:
                answers.append({"ok": False, "error": e.strerror or str(e)})
        return {"ok": all(a.get("ok") for a in answers), "processes": answers}

    async def _metrics(self, per_process: bool) -> CollectorRegistry:
        """A scrape: every child's samples, merged (metrics_merge.py)."""
        async def one(c: _Child) -> list[Family] | None:
            path = os.path.join(child_dir(self.cfg.server.state_dir, c.index), "admin.sock")
            try:
                reply = await asyncio.to_thread(query, path, "metrics", 5.0)
                return families(reply.get("families"))
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("metrics: a gateway process did not answer",
                            extra={"index": c.index, "error": str(e)})
                return None
        got = await asyncio.gather(*(one(c) for c in self.children))
        parts = {c.index: f for c, f in zip(self.children, got, strict=True) if f is not None}
        return merged_registry(parts, len(self.children) - len(parts), per_process)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hangup)
        self.children = [_Child(k) for k in range(self.count)]
        lanes = self.balancer.lanes
        for c in self.children:
            c.start(self.config_path, lanes[c.index])
        lines = [await c.first_line for c in self.children]
        if not all(_serving(ln) for ln in lines):
            log.error("a gateway process did not start", extra={"processes": self.count})
            await self._stop_children()
            return 2
        for lane in lanes:
            lane.ready = True
        accepting = [asyncio.ensure_future(self._accept(i, s)) for i, s in self._socks]
        self.admin = AdminServer(admin_socket_path(self.cfg.server.state_dir,
                                                   self.cfg.server.admin_socket),
                                 self.status, self._reload)
        await self.admin.start()
        if self.cfg.metrics.listen is not None:
            try:
                self.metrics = MetricsServer(self.cfg.metrics.listen, source=self._metrics,
                                             tls=tls_for(self.cfg.metrics))
                await self.metrics.start()
            except (OSError, SocketInUse) as e:
                self.metrics = None
                print(f"{self.cfg.source}: metrics.listen: {e}; free the address or change "
                      "[metrics] listen (or its tls_cert/tls_key)", file=sys.stderr)
                await self._stop_children()
                await self.admin.stop()
                return 2
        if lines[0].strip():
            print(lines[0].strip(), flush=True)
        print(f"# {self.count} gateway processes", flush=True)
        if self.metrics is not None:
            print(f"# metrics on {self.metrics.bound} (GET /metrics)", flush=True)
        systemd.notify("READY=1", f"STATUS=serving with {self.count} processes",
                       f"MAINPID={os.getpid()}")
        watchers = [asyncio.ensure_future(self._watch(c)) for c in self.children]
        await stop.wait()
        self.stopping = True
        systemd.notify("STOPPING=1")
        for w in watchers + accepting:
            w.cancel()
        if self.metrics is not None:
            await self.metrics.stop()
        await self._stop_children()
        await self.admin.stop()
        for b in self._bound:
            b.unlink()
        return 0

    async def _accept(self, index: int, lsock: socket.socket) -> None:
        """Accepts the connections of one listening socket and hands each on."""
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        while True:
            while not self.balancer.order():
                await asyncio.sleep(0.05)  # every child restarting: clients wait queued
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as e:  # EMFILE and the like: do not spin, do not stop
                log.error("cannot accept a connection", extra={"error": str(e)})
                await asyncio.sleep(0.1)
                continue
            with conn:
                if not self.balancer.hand(index, conn):
                    log.warning("no gateway process could take a connection; closed it")

    async def _watch(self, c: _Child) -> None:
        try:
            await self._keep_running(c)
        except Exception:
            log.exception("supervising a gateway process failed", extra={"index": c.index})
            raise

    async def _keep_running(self, c: _Child) -> None:
        backoff = RESTART_BACKOFF[0]
        while not self.stopping:
            rc = await c.wait()
            self.balancer.lanes[c.index].ready = False
            if self.stopping:
                return
            moved = self.balancer.rehome(c.index)
            if moved:
                log.info("connections handed to a process that died went to another",
                         extra={"index": c.index, "connections": moved})
            lived = time.monotonic() - c.started
            backoff = RESTART_BACKOFF[0] if lived > 30 else min(backoff * 2, RESTART_BACKOFF[1])
            log.warning("gateway process died; restarting it",
                        extra={"index": c.index, "rc": rc, "after": round(backoff, 1)})
            await asyncio.sleep(backoff)
            c.restarts += 1
            lane = self.balancer.lanes[c.index]
            c.start(self.config_path, lane)
            # it takes connections once it serves; one that did not start dies again
            if _serving(await c.first_line):
                lane.ready = True

    def _forward_hangup(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGHUP)

    async def _stop_children(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.terminate()
        for c in self.children:
            if c.proc is None:
                continue
            try:
                await asyncio.wait_for(c.wait(), 15)
            except TimeoutError:
                c.proc.kill()
                await c.wait()


def _serving(first_line: str) -> bool:
    """A child's first line of output says it serves (the address, or a comment)."""
    return "P11_KIT_SERVER_ADDRESS=" in first_line or first_line.startswith("#")


def supervise(cfg: Config, config_path: str) -> int:
    sup = Supervisor(cfg, config_path)
    for i in range(sup.count):
        Path(child_dir(cfg.server.state_dir, i)).mkdir(mode=0o700, exist_ok=True)
    try:
        sup.bind()
    except (OSError, SocketInUse) as e:
        print(f"{cfg.source}: server.listen: {e}; free the address or change [server] listen",
              file=sys.stderr)
        return 2
    return asyncio.run(sup.run())

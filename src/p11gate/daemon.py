"""`p11gate serve`: load the configuration, start the gateway, run until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import logs, systemd
from .audit import NotRegularFile
from .config import Config, ConfigError, load_config, parse_config
from .config_checks import check
from .frontend.limits import limited_log, refusal_log
from .gateway import Gateway
from .metrics_http import MetricsServer, tls_for
from .processes import child_config, child_dir, child_index, handoff_from_supervisor, supervise
from .registry import RegistryError
from .reload import Reloader
from .state import StoreError, StoreUnusable
from .state_dir import DAEMON_UMASK, StateDirInUse, StateLock, tighten_and_warn
from .unix_socket import SocketInUse

log = logging.getLogger("p11gate")


def _load(config_path: str | None, state_dir: str | None, listen: str | None) -> Config:
    if config_path is not None:
        cfg = load_config(config_path)
    else:
        from .demo import default_state_dir, demo_config

        raw = demo_config(Path(state_dir) if state_dir else default_state_dir())
        cfg = parse_config(raw, "<demo>")
    if listen is not None:
        server = cfg.server.model_copy(update={"listen": [listen]})
        cfg = cfg.model_copy(update={"server": server})
    return cfg


def _hangup(gw: Gateway | None, reloader: Reloader | None) -> None:
    """SIGHUP (logrotate, `systemctl reload`): reopen the log and audit files by name,
    then re-read the configuration file (reload.py). systemd hears RELOADING=1 before
    and READY=1 once the reload is done or refused, so `systemctl reload` returns then."""
    systemd.reloading()
    try:
        _reopen(gw)
    finally:
        if reloader is None:  # a SIGHUP while the gateway starts: logs only
            systemd.notify("READY=1", "STATUS=serving")
        else:
            task = asyncio.get_running_loop().create_task(reloader.reload())
            _reloads.add(task)
            task.add_done_callback(_reloaded)


#: reloads under way (a reference keeps each task alive until it is done)
_reloads: set[asyncio.Task[dict[str, object]]] = set()


def _reloaded(task: asyncio.Task[dict[str, object]]) -> None:
    _reloads.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("configuration reload failed", extra={"error": repr(task.exception())})
    systemd.notify("READY=1", "STATUS=serving")


def _reopen(gw: Gateway | None) -> None:
    files = logs.reopen()
    if gw is not None and gw.audit.enabled:
        try:
            gw.audit.reopen()
            files.append(str(gw.audit.path))
        except NotRegularFile as e:
            log.error("SIGHUP: the audit file is not a regular file; every audited call "
                      "is refused until a SIGHUP finds a regular file there",
                      extra={"path": gw.audit.path, "error": e.strerror,
                             "required": gw.audit.required})
        except OSError as e:
            log.error("SIGHUP: cannot reopen the audit log; still writing to the old file",
                      extra={"path": gw.audit.path, "error": e.strerror})
    log.warning("SIGHUP: reopened logs; reloading the configuration",
                extra={"reopened": files})


async def _serve(cfg: Config, config_path: str | None) -> int:
    demo = config_path is None
    loop = asyncio.get_running_loop()
    current: list[Gateway] = []
    reloader: list[Reloader] = []  # set once the gateway serves
    # first thing on the loop: a SIGHUP while the back ends start must not kill us
    loop.add_signal_handler(signal.SIGHUP, lambda: _hangup(
        current[0] if current else None, reloader[0] if reloader else None))
    try:
        gw = Gateway(cfg)
    except StoreUnusable as e:
        print(f"{cfg.source}: {e}", file=sys.stderr)  # one line: the store and the fix
        return 2
    except RegistryError as e:
        print(f"{cfg.source}: registry {e.path}: {e.reason}; free space on its file system "
              "and make it writable by the gateway's user", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"{cfg.source}: state store {e.where}: {e.reason}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{cfg.source}: server.state_dir / audit.file: cannot use "
              f"{e.filename or cfg.server.state_dir}: {e.strerror}; set [server] state_dir "
              "(and [audit] file) to a writable directory", file=sys.stderr)
        return 2
    current.append(gw)
    # socket activation: listeners systemd bound, matched to [server] listen by address
    # [server] processes: the supervisor accepts, and hands each connection over
    gw.handoff = handoff_from_supervisor(lambda: len(gw.connections))
    if gw.handoff is None:
        gw.inherited = systemd.inherited_sockets()
    try:
        await gw.start()
        unmatched = gw.inherited.leftovers()
        if unmatched:
            print(f"{cfg.source}: server.listen: systemd passed sockets that no listen "
                  f"address matches: {'; '.join(unmatched)}; make the socket unit's "
                  "ListenStream= and [server] listen name the same addresses",
                  file=sys.stderr)
            await gw.stop()
            return 2
    except SocketInUse as e:  # another live gateway: leave its files alone
        print(f"{cfg.source}: {e}", file=sys.stderr)
        await gw.stop()
        return 2
    except OSError as e:  # a listener: port in use, no permission, …
        print(f"{cfg.source}: server.listen: {e}; free the address or change [server] listen",
              file=sys.stderr)
        await gw.stop()
        return 2
    try:
        metrics = await _start_metrics(cfg, gw)
    except (OSError, SocketInUse) as e:
        print(f"{cfg.source}: metrics.listen: {e}; free the address or change [metrics] "
              "listen (or its tls_cert/tls_key)", file=sys.stderr)
        await gw.stop()
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    local = [a for a in cfg.server.listen if a.startswith("unix:")]
    if local:
        # the line clients export, as `p11-kit server` prints it
        print(f"P11_KIT_SERVER_ADDRESS={local[0]}; export P11_KIT_SERVER_ADDRESS;", flush=True)
    for a in cfg.server.listen:
        if a.startswith("tls:"):
            print(f"# listening on {a} (remote clients: p11gate tunnel or p11gate agent)",
                  flush=True)
    if metrics is not None:
        print(f"# metrics on {metrics.bound} (GET /metrics)", flush=True)
    if demo:
        print(f"# demo token {cfg.token[0].name!r}, user PIN 1234 (built-in soft token in "
              f"{cfg.server.state_dir})", file=sys.stderr, flush=True)
    # listeners accept clients and the tokens are attached: systemd may start the units
    # that need us (Type=notify)
    systemd.notify("READY=1", f"STATUS=serving {len(gw.tokens)} token(s)",
                   f"MAINPID={os.getpid()}")
    if config_path is not None:  # demo mode has no file: SIGHUP reopens logs only
        reloader.append(Reloader(gw, config_path))
        gw.on_reload = reloader[0].reload  # `p11gate reload` through the admin socket
    watchdog = systemd.start_watchdog()
    await stop.wait()
    systemd.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopping")
    if metrics is not None:
        await metrics.stop()
    await gw.stop()
    limited_log.flush_all()  # the counts of records held back for a summary are not lost
    refusal_log.flush_all()
    return 0


async def _start_metrics(cfg: Config, gw: Gateway) -> MetricsServer | None:
    """The Prometheus endpoint when [metrics] listen is set (None: off)."""
    if cfg.metrics.listen is None:
        return None
    from .frontend.metrics_state import snapshot

    server = MetricsServer(cfg.metrics.listen, gw.metrics, lambda: snapshot(gw),
                           tls=tls_for(cfg.metrics))
    await server.start()
    return server


def _lock(config_path: str | None, state_dir: str | None) -> tuple[StateLock, Config]:
    """Lock the state directory before anything else touches it, then load the
    configuration (demo mode creates its token there)."""
    if config_path is None:
        from .demo import default_state_dir

        lock = StateLock(str(Path(state_dir) if state_dir else default_state_dir()))
        return lock, _load(config_path, state_dir, None)
    cfg = load_config(config_path)
    index = child_index()
    if index is not None:  # one of [server] processes: the supervisor holds state_dir
        cfg = child_config(cfg, index)
        return StateLock(child_dir(cfg.server.state_dir, index)), cfg
    return StateLock(cfg.server.state_dir), cfg


def run(config_path: str | None, state_dir: str | None = None, listen: str | None = None) -> int:
    # everything the daemon creates (registry, audit, lock, demo token) is owner-only;
    # sockets get their configured mode explicitly
    os.umask(DAEMON_UMASK)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the event loop handles it
    try:
        lock, cfg = _lock(config_path, state_dir)
        if listen is not None:
            server = cfg.server.model_copy(update={"listen": [listen]})
            cfg = cfg.model_copy(update={"server": server})
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except StateDirInUse as e:
        print(f"p11gate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"p11gate: server.state_dir: cannot use {e.filename}: {e.strerror}; set "
              "[server] state_dir to a directory this user can write", file=sys.stderr)
        return 2
    try:
        try:
            logs.setup(cfg.server.log_level, cfg.server.log_format, cfg.server.log_file)
        except OSError as e:
            print(f"{cfg.source}: server.log_file: cannot open {e.filename}: {e.strerror}",
                  file=sys.stderr)
            return 2
        tighten_and_warn(cfg.server.state_dir)
        if config_path is not None:
            findings = check(cfg)
            for w in findings.warnings:
                log.warning(w)
            if findings.errors:
                for err in findings.errors:
                    print(err, file=sys.stderr)
                return 2
        if (config_path is not None and child_index() is None
                and cfg.server.process_count() > 1):
            return supervise(cfg, config_path)
        if cfg.server.uvloop:
            try:
                import uvloop

                return uvloop.run(_serve(cfg, config_path))
            except ImportError:
                pass
        return asyncio.run(_serve(cfg, config_path))
    finally:
        lock.release()

"""`p11gate serve`: load the configuration, start the gateway, run until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from . import logs
from .config import Config, ConfigError, load_config, parse_config
from .frontend.server import Gateway
from .registry import RegistryError, RegistryUnusable

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


async def _serve(cfg: Config, demo: bool) -> int:
    try:
        gw = Gateway(cfg)
    except RegistryUnusable as e:
        print(f"{cfg.source}: {e}", file=sys.stderr)  # one line: the file and the fix
        return 2
    except RegistryError as e:
        print(f"{cfg.source}: registry {e.path}: {e.reason}; free space on its file system "
              "and make it writable by the gateway's user", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{cfg.source}: server.state_dir / audit.file: cannot use "
              f"{e.filename or cfg.server.state_dir}: {e.strerror}; set [server] state_dir "
              "(and [audit] file) to a writable directory", file=sys.stderr)
        return 2
    try:
        await gw.start()
    except OSError as e:  # a listener: port in use, no permission, …
        print(f"{cfg.source}: server.listen: {e}; free the address or change [server] listen",
              file=sys.stderr)
        await gw.stop()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
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
    if demo:
        print(f"# demo token {cfg.token[0].name!r}, user PIN 1234 (SoftHSMv2 in "
              f"{cfg.server.state_dir})", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("stopping")
    await gw.stop()
    return 0


def run(config_path: str | None, state_dir: str | None = None, listen: str | None = None) -> int:
    try:
        cfg = _load(config_path, state_dir, listen)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    logs.setup(cfg.server.log_level, cfg.server.log_format)
    if cfg.server.uvloop:
        try:
            import uvloop

            return uvloop.run(_serve(cfg, config_path is None))
        except ImportError:
            pass
    return asyncio.run(_serve(cfg, config_path is None))

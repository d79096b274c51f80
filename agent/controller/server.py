"""blockferry-controller: load the config, migrate the database, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from agent import __version__, logs, systemd
from agent.controller import config
from agent.errors import BlockferryError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blockferry-controller", description=__doc__)
    p.add_argument("-c", "--config", default=config.DEFAULT_CONFIG, help="config file (TOML)")
    p.add_argument("--conf-dir", help="conf.d directory (default: controller.conf.d beside --config)")
    p.add_argument("--version", action="version", version=f"blockferry-controller {__version__}")
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.config, args.conf_dir)
        logs.setup(cfg.log_level, cfg.log_format, secrets=config.secrets_of(cfg))
        for chatty in ("httpx", "httpcore"):  # they log whole URLs; a webhook's may hold a token
            logging.getLogger(chatty).setLevel(logging.WARNING)
        from agent.controller.api.app import create_app
        from agent.controller.db import Database, migrate
        from agent.controller.registry import serve
        from agent.controller.secrets import SecretBox

        migrate(cfg.database_url)
        db = Database(cfg.database_url)
        app = create_app(cfg, db, SecretBox.from_file(cfg.secret_key_file))
        registry = serve(cfg, db)  # agents register and heartbeat here
        app.state.ctx.registry_ready = True
    except BlockferryError as e:
        print(f"blockferry-controller: {e.code}: {e.message}", file=sys.stderr)
        return 78  # EX_CONFIG
    import contextlib
    import signal

    import uvicorn

    host, port = cfg.host_port
    tls = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key} if cfg.tls_cert else {}
    # log_config=None: uvicorn's records go through logs.setup's handler (journal priorities, JSON)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=cfg.log_level, access_log=False, log_config=None, **tls)
    )
    # SIGTERM/SIGINT: a graceful stop and exit status 0 (uvicorn would re-raise the signal)
    server.capture_signals = contextlib.nullcontext

    def stop(signum, frame):
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=_systemd, args=(server, app), name="sd-notify", daemon=True).start()
    try:
        server.run()
    finally:
        systemd.notify("STOPPING=1")
        registry.stop(grace=2)
    return 0


def _systemd(server, app) -> None:
    """READY=1 once uvicorn listens (systemd Type=notify), then watchdog
    pings while the dispatcher and the scheduler threads live."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    ctx = app.state.ctx
    systemd.notify(f"READY=1\nSTATUS=serving REST on {ctx.cfg.listen}\nMAINPID={os.getpid()}")
    interval = systemd.watchdog_interval()
    if interval:

        def healthy() -> bool:
            threads = (ctx.dispatcher._thread, ctx.scheduler._thread)
            return all(t is not None and t.is_alive() for t in threads)

        systemd.Watchdog(interval, healthy).start()


if __name__ == "__main__":
    sys.exit(main())

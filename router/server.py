"""Run the app: logging, the listening socket, signals."""

from __future__ import annotations

import logging

from aiohttp import web

from router import __version__
from router.app import make_app
from router.config import DEMO_MODELS, Config

__all__ = ["run"]

log = logging.getLogger("router")

SHUTDOWN_TIMEOUT = 30.0
"""Seconds SIGTERM/SIGINT waits for running requests and streams before cancelling them."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run(config: Config) -> None:
    configure_logging(config.log_level)
    app = make_app(config)

    def announce(_: str) -> None:
        log.info("router %s listening on http://%s:%d", __version__, config.host, config.port)
        if config.demo:
            log.info(
                "try: curl http://127.0.0.1:%d/v1/chat/completions -H 'Content-Type: "
                "application/json' -d '{\"model\": \"%s\", \"messages\": "
                "[{\"role\": \"user\", \"content\": \"hello\"}]}'",
                config.port, DEMO_MODELS[0],
            )

    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            # Without it a handler learns of a disconnect only at its next write, and a backend
            # computing a first token would keep working for a client that is gone.
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=None,
            print=announce,
        )
    except OSError as error:  # e.g. the port is taken: one line, not a traceback
        log.critical("router stopped: %s", error)
        raise SystemExit(1) from None

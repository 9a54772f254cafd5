"""Run the app: logging, the listening socket, signals, readiness and the drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from router import __version__
from router.app import make_app
from router.config.settings import DEMO_MODELS, Config
from router.keys import LIVE_REQUESTS
from router.serve.connection_errors import JsonErrorsHandler
from router.serve.reload import Reloader
from router.serve.systemd import Notifier

__all__ = ["serve"]

log = logging.getLogger("router")

CUT_GRACE = 5.0
"""Seconds cancelled requests get to finish their cleanup once the drain timed out."""


def announce(config: Config, port: int) -> None:
    log.info("router %s listening on http://%s:%d", __version__, config.host, port)
    if config.demo:
        log.info(
            "try: curl http://127.0.0.1:%d/v1/chat/completions -H 'Content-Type: "
            "application/json' -d '{\"model\": \"%s\", \"messages\": "
            "[{\"role\": \"user\", \"content\": \"hello\"}]}'",
            port, DEMO_MODELS[0],
        )


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    load: Callable[[], Config] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain: `/ready` turns 503, new
    connections are still taken for `shutdown_delay` seconds (while load balancers notice),
    then the socket closes and running requests get up to `drain_timeout` to finish.
    With `load` (how to read the configuration again), SIGHUP reloads it. With several
    workers (`config.workers`), each serves the same port (SO_REUSEPORT) and reports to the
    supervisor through `notifier`; without one (`python -m router` passes systemd's), no
    state is sent anywhere."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = notifier or Notifier({})
    app = make_app(config)
    reloader = Reloader(app, load) if load is not None else None
    if reloader is not None and config.dynamic_config_file:
        app.cleanup_ctx.append(
            reloader.watching(config.dynamic_config_file, config.dynamic_config_interval))
    elif reloader is not None and config.config_watch and config.config_file:
        app.cleanup_ctx.append(reloader.watching(config.config_file, 1.0))
    # Without handler_cancellation a handler learns of a disconnect only at its next write,
    # and a backend computing a first token would keep working for a client that is gone.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0,
        keepalive_timeout=config.keepalive_timeout,
        max_line_size=config.max_header_size, max_field_size=config.max_header_size,
    )
    await runner.setup()
    tasks: set[asyncio.Task[object]] = set()
    try:
        listener = await loop.create_server(
            HeaderDeadline(runner.server, config.client_header_timeout),
            config.host, config.port, reuse_address=True, reuse_port=config.workers > 1,
        )
        announce(config, listener.sockets[0].getsockname()[1])
        if reloader is not None:
            # Before READY=1: a reload sent as soon as the router is ready (systemctl reload,
            # or the supervisor of --workers passing one on) must not meet SIGHUP's default
            # action, which ends the process.
            loop.add_signal_handler(signal.SIGHUP, lambda: tasks.add(
                asyncio.create_task(reloader.reload("SIGHUP"))
            ))
        notifier.notify("READY=1")
        tasks.add(asyncio.create_task(notifier.watchdog()))
        await stop.wait()
        await drain(app, listener, config, notifier)
    finally:
        for task in tasks:
            task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        notifier.close()


async def drain(app: web.Application, listener: asyncio.Server, config: Config,
                notifier: Notifier) -> None:
    requests = app[LIVE_REQUESTS]
    requests.draining = True
    notifier.notify("STOPPING=1")
    log.info("draining: %d requests running, up to %g s", requests.live, config.drain_timeout)
    if config.shutdown_delay > 0:
        await asyncio.sleep(config.shutdown_delay)
    listener.close()
    if not await requests.wait(config.drain_timeout):
        log.warning("drain timeout: cutting %d requests still running", requests.cancel_all())
        await requests.wait(CUT_GRACE)
    log.info("drained; stopping")


class HeaderDeadline:
    """The listening socket's protocol factory: a new connection gets the router's handler
    (`JsonErrorsHandler`) and must deliver its first request's headers within `timeout`
    seconds or be closed. aiohttp has no such timer, so
    a client sending half a request line would hold a connection and a task forever."""

    def __init__(self, server: web.Server | None, timeout: float) -> None:
        assert server is not None, "the runner is set up first"
        self._server = server
        self._timeout = timeout

    def __call__(self) -> asyncio.Protocol:
        handler = JsonErrorsHandler.adopt(self._server())
        asyncio.get_running_loop().call_later(self._timeout, close_if_idle, handler)
        return handler


def close_if_idle(handler: asyncio.Protocol) -> None:
    # aiohttp counts the request heads it parsed on a connection in `_request_count`.
    if getattr(handler, "_request_count", 1) == 0:
        transport = getattr(handler, "transport", None)
        if transport is not None:
            transport.close()

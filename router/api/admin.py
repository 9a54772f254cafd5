"""The router's own endpoints: liveness, version, Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router import __version__
from router.keys import METRICS, POOL, STATS

__all__ = ["add_routes"]


async def health(request: web.Request) -> web.Response:
    """Liveness: cheap, true while the event loop runs."""
    app = request.app
    return web.json_response(
        {
            "status": "ok",
            "backends": len(app[POOL].backends),
            "in_flight": app[STATS].total_in_flight(),
        }
    )


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)

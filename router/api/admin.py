"""The router's own endpoints: liveness, version, the fleet's state, Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router import __version__
from router.api.middleware import expect_handler
from router.keys import (
    CHOOSER, ENGINE_STATS, FLEET_PUBLISHER, HEALTH, KV_CACHE, LIVE_REQUESTS, METRICS, POOL,
    RUNTIME_WORKERS, STATS,
)
from router.observe import multiprocess

__all__ = ["add_routes"]


async def health(request: web.Request) -> web.Response:
    """Liveness: cheap, true while the event loop runs. `status` is production-stack's
    `healthy`; `routing` is the policy `/engines` showed before it became a list."""
    app = request.app
    return web.json_response(
        {
            "status": "healthy",
            "backends": len(app[POOL].backends),
            "in_flight": app[STATS].total_in_flight(),
            "routing": repr(app[CHOOSER].policy),
        }
    )


async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 while draining or while no backend can take a request."""
    app = request.app
    if app[LIVE_REQUESTS].draining:
        return web.json_response({"status": "draining"}, status=503)
    health, pool = app[HEALTH], app[POOL]
    # What the request path would route to: with every breaker open, the ejection cap still
    # keeps backends the probes pass, and the router still serves.
    available = len({backend.id for model in pool.models()
                     for backend in health.routable(pool.candidates(model))})
    if not available:
        return web.json_response({"status": "no available backend"}, status=503)
    return web.json_response({"status": "ready", "available_backends": available})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


def engine_entries(app: web.Application) -> list[dict[str, Any]]:
    """`/engines`: one entry per backend. production-stack's fields first (`engine_id`, the
    id `?id=` pins a request to; `serving_models`; `created`, when it came into the pool),
    then ours: its health, the router's request figures over the stats window and the
    engine's last scraped figures (`age_s`: seconds since that scrape)."""
    now = time.monotonic()
    pool = app[POOL]
    kept: dict[str, list[str]] = {}
    for model in pool.models():
        for backend in app[HEALTH].kept_by_cap(pool.candidates(model)):
            kept.setdefault(backend.id, []).append(model)
    listing: list[dict[str, Any]] = []
    for backend in pool.backends:
        health = app[HEALTH].state(backend.id)
        snapshot = app[ENGINE_STATS].get(backend.id)
        window = app[STATS].for_backend(backend.id).snapshot()
        engine: dict[str, Any] | None = None
        if snapshot is not None:
            engine = {
                "age_s": round(snapshot.age(now), 3),
                "num_requests_running": snapshot.running,
                "num_requests_waiting": snapshot.waiting,
                "kv_cache_usage_perc": snapshot.kv_cache_usage,
                "prefix_cache_hits": snapshot.prefix_cache_hits,
                "prefix_cache_queries": snapshot.prefix_cache_queries,
            }
        listing.append({
            "engine_id": backend.id,
            "serving_models": list(backend.models),
            "created": int(pool.added_at(backend.id)),
            "id": backend.id,
            "kind": backend.kind,
            "source": app[RUNTIME_WORKERS].source(backend),
            "url": backend.url,
            "models": list(backend.models),
            "labels": list(backend.labels),
            "healthy": health.available,
            "breaker": health.breaker,
            "consecutive_failures": health.consecutive_failures,
            "kept_by_ejection_cap": kept.get(backend.id, []),
            "probe_ok": health.probe_ok,
            "last_probe_error": health.last_probe_error,
            "in_flight": window.in_flight,
            "qps": round(window.qps, 3),
            "avg_ttft_s": window.avg_ttft,
            "avg_latency_s": window.avg_latency,
            "engine": engine,
            "last_scrape_error": app[ENGINE_STATS].last_error(backend.id),
            "kv_events": kv_entry(app, backend.id),
        })
    return listing


def kv_entry(app: web.Application, backend_id: str) -> dict[str, Any] | None:
    """What the KV events say of one engine (`kvaware`), None while it sends none: the
    blocks indexed, the stream's state, and the share of prompt tokens the router expected
    cached in the requests it sent there (compare with the engine's own hits / queries)."""
    kv = app[KV_CACHE]
    stats = kv.feeds.stats.get(backend_id) if kv.feeds is not None else None
    if stats is None:
        return None
    engine = kv.index.engines.get(backend_id)
    predicted = kv.predicted.get(backend_id)
    return {
        "index_blocks": len(engine) if engine is not None else 0,
        "streams": stats.sources,
        "batches": stats.batches,
        "lag_s": None if stats.lag is None else round(stats.lag, 4),
        "gaps_replayed": stats.gaps_replayed,
        "gaps_lost": stats.gaps_lost,
        "restarts": stats.restarts,
        "skipped": stats.malformed + stats.events_skipped,
        "predicted_hit_rate": (
            round(predicted.cached_tokens / predicted.prompt_tokens, 4)
            if predicted is not None and predicted.prompt_tokens else None
        ),
    }


async def engines(request: web.Request) -> web.Response:
    """production-stack's shape, a JSON list (its tutorials read `.[0].engine_id`), each
    entry carrying our fields too; the routing policy is on `/health`."""
    return web.json_response(engine_entries(request.app))


async def metrics(request: web.Request) -> web.Response:
    publisher = request.app[FLEET_PUBLISHER]
    await request.app[METRICS].sample_process()
    if publisher is not None:  # --workers: every worker's figures
        body = await multiprocess.render(publisher)
    else:
        body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health, expect_handler=expect_handler)
    app.router.add_get("/ready", ready, expect_handler=expect_handler)
    app.router.add_get("/version", version, expect_handler=expect_handler)
    app.router.add_get("/metrics", metrics, expect_handler=expect_handler)
    app.router.add_get("/engines", engines, expect_handler=expect_handler)

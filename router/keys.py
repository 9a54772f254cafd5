"""Every piece of application state, as typed `web.AppKey`s (no module globals).

The types are imported for the type checker only: a module that reads a key (the request
path reads many) does not import, through this one, the modules that own the state
(subscribers, discovery, the batch runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiohttp

    from router.api.auth import ApiKeys
    from router.backends.pool import BackendPool
    from router.backends.response_homes import ResponseHomes
    from router.backends.tracker import HealthTracker
    from router.batch.batches import Batches
    from router.config.settings import Config
    from router.discovery.runtime import RuntimeWorkers
    from router.events import RequestEvents
    from router.kvcache.state import KvCache
    from router.observe.metrics import Metrics
    from router.observe.multiprocess import FleetPublisher
    from router.plugins import PluginHost, RequestRewriter
    from router.policies.chooser import BackendChooser
    from router.proxy.admission import Admission, RateLimiter
    from router.proxy.failover import PrefillHop
    from router.proxy.headers import UpstreamAuth
    from router.proxy.live import LiveRequests
    from router.proxy.retries import RetryBudget
    from router.stats.engine import EngineStats
    from router.stats.requests import RequestStats

__all__ = [
    "CONFIG", "POOL", "HEALTH", "CHOOSER", "EVENTS", "STATS", "ENGINE_STATS",
    "METRICS", "CLIENT_SESSION", "LIVE_REQUESTS", "UPSTREAM_AUTH", "API_KEYS", "ADMISSION",
    "RATE_LIMITER", "FLEET_PUBLISHER", "PLUGINS", "REWRITER", "BATCHES", "PREFILL_HOP",
    "RETRY_BUDGET", "RESPONSE_HOMES", "RUNTIME_WORKERS",
]

CONFIG: web.AppKey[Config] = web.AppKey("config")
POOL: web.AppKey[BackendPool] = web.AppKey("pool")
RUNTIME_WORKERS: web.AppKey[RuntimeWorkers] = web.AppKey("runtime_workers")
"""The worker API's additions and removals, an overlay on discovery's backends."""
HEALTH: web.AppKey[HealthTracker] = web.AppKey("health")
CHOOSER: web.AppKey[BackendChooser] = web.AppKey("chooser")
EVENTS: web.AppKey[RequestEvents] = web.AppKey("events")
STATS: web.AppKey[RequestStats] = web.AppKey("stats")
ENGINE_STATS: web.AppKey[EngineStats] = web.AppKey("engine_stats")
KV_CACHE: web.AppKey[KvCache] = web.AppKey("kv_cache")
"""What the engines' KV events say they hold, and the clients that learn it (`kvaware`)."""
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
LIVE_REQUESTS: web.AppKey[LiveRequests] = web.AppKey("live_requests")
"""Every proxied request running now: the drain at shutdown waits for them."""
UPSTREAM_AUTH: web.AppKey[UpstreamAuth] = web.AppKey("upstream_auth")
RETRY_BUDGET: web.AppKey[RetryBudget] = web.AppKey("retry_budget")
"""Requests and retries in flight: retries are allowed while they are few enough."""
PREFILL_HOP: web.AppKey[PrefillHop] = web.AppKey("prefill_hop")
API_KEYS: web.AppKey[ApiKeys] = web.AppKey("api_keys")
ADMISSION: web.AppKey[Admission | None] = web.AppKey("admission")
"""None without --max-concurrent-requests."""
RATE_LIMITER: web.AppKey[RateLimiter | None] = web.AppKey("rate_limiter")
"""None without --rate-limit."""
FLEET_PUBLISHER: web.AppKey[FleetPublisher | None] = web.AppKey("fleet_publisher")
"""Only in a worker of `--workers N`: publishes the fleet gauges for the other workers."""
PLUGINS: web.AppKey[PluginHost | None] = web.AppKey("plugins")
"""None without --callbacks."""
REWRITER: web.AppKey[RequestRewriter | None] = web.AppKey("rewriter")
"""None without --request-rewriter."""
CLIENT_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("client_session")
"""The one session (and connection pool) for every backend call; owned by a cleanup_ctx."""
RESPONSE_HOMES: web.AppKey[ResponseHomes] = web.AppKey("response_homes")
"""Which backend stored each `/v1/responses` answer (`router.backends.response_homes`)."""
BATCHES: web.AppKey[Batches] = web.AppKey("batches")
"""Only with --enable-batch-api: the files, the batches and their runners."""

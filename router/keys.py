"""Every piece of application state, as typed `web.AppKey`s (no module globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from router.api.auth import ApiKeys
from router.backends.pool import BackendPool
from router.backends.tracker import HealthTracker
from router.config.settings import Config
from router.events import RequestEvents
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

if TYPE_CHECKING:  # router.batch reads these keys: a runtime import would be circular
    from router.batch.batches import Batches

__all__ = [
    "CONFIG", "POOL", "HEALTH", "CHOOSER", "EVENTS", "STATS", "ENGINE_STATS",
    "METRICS", "CLIENT_SESSION", "LIVE_REQUESTS", "UPSTREAM_AUTH", "API_KEYS", "ADMISSION",
    "RATE_LIMITER", "FLEET_PUBLISHER", "PLUGINS", "REWRITER", "BATCHES", "PREFILL_HOP",
    "RETRY_BUDGET",
]

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", BackendPool)
HEALTH = web.AppKey("health", HealthTracker)
CHOOSER = web.AppKey("chooser", BackendChooser)
EVENTS = web.AppKey("events", RequestEvents)
STATS = web.AppKey("stats", RequestStats)
ENGINE_STATS = web.AppKey("engine_stats", EngineStats)
METRICS = web.AppKey("metrics", Metrics)
LIVE_REQUESTS = web.AppKey("live_requests", LiveRequests)
"""Every proxied request running now: the drain at shutdown waits for them."""
UPSTREAM_AUTH = web.AppKey("upstream_auth", UpstreamAuth)
RETRY_BUDGET = web.AppKey("retry_budget", RetryBudget)
"""Requests and retries in flight: retries are allowed while they are few enough."""
PREFILL_HOP = web.AppKey("prefill_hop", PrefillHop)
API_KEYS = web.AppKey("api_keys", ApiKeys)
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
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
"""The one session (and connection pool) for every backend call; owned by a cleanup_ctx."""
BATCHES: web.AppKey[Batches] = web.AppKey("batches")
"""Only with --enable-batch-api: the files, the batches and their runners."""

"""`make_app(config)`: the Application, its state (AppKeys) and the owners of its resources."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from router import batch
from router.api import admin, dashboard, engine_admin, openai, realtime, workers
from router.api.auth import ApiKeys, auth_middleware
from router.api.middleware import guard, json_errors
from router.backends.pool import BackendPool
from router.backends.prober import HealthProber
from router.backends.response_homes import ResponseHomes
from router.backends.tracker import HealthTracker
from router.config.settings import Config
from router.discovery.external import external_backends
from router.discovery.kubernetes import kubernetes_discovery
from router.discovery.runtime import RuntimeWorkers
from router.discovery.static import static_backends
from router.events import RequestEvents
from router.flow import Outcome
from router.keys import (
    ADMISSION, API_KEYS, BATCHES, CHOOSER, CLIENT_SESSION, CONFIG, ENGINE_STATS, EVENTS,
    FLEET_PUBLISHER, HEALTH, KV_CACHE, LIVE_REQUESTS, METRICS, PLUGINS, POOL, PREFILL_HOP,
    RATE_LIMITER, RESPONSE_HOMES, RETRY_BUDGET, REWRITER, RUNTIME_WORKERS, STATS, UPSTREAM_AUTH,
)
from router.kvcache.feeds import KvEventFeeds
from router.kvcache.index import KvIndex
from router.kvcache.prompt_tokens import PromptTokens
from router.kvcache.state import KvCache
from router.observe.access_log import AccessLog
from router.observe.kv_gauges import KvGauges
from router.observe.metrics import Metrics
from router.observe.multiprocess import FleetPublisher
from router.observe.tracing import make_tracer
from router.plugins import PluginHost, RequestRewriter, load_object
from router.policies import PolicyContext, make_policy
from router.policies.chooser import BackendChooser
from router.proxy.admission import Admission, RateLimiter
from router.proxy.failover import PrefillHop
from router.proxy.headers import UpstreamAuth
from router.proxy.live import LiveRequests
from router.proxy.retries import RetryBudget
from router.proxy.sinks import cut_client
from router.proxy.timeouts import ProxyTimeout
from router.proxy.upstream_pool import GuardedConnector
from router.stats.engine import EngineScraper, EngineStats
from router.stats.requests import RequestStats

__all__ = ["make_app"]

log = logging.getLogger("router")


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the one ClientSession (and connection pool) for all backend calls."""
    config = app[CONFIG]
    connector = app[METRICS].connector(
        limit=config.max_upstream_connections,
        keepalive_timeout=config.upstream_keepalive,
        read_size=config.stream_buffer_size,
    )
    # No total timeout: streams may run for hours. Each phase has its own bound instead
    # (router.proxy.timeouts): connecting, waiting for the answer (a non-streamed generation
    # answers only when done), the head once started, and each silence of the body.
    timeout = ProxyTimeout(
        total=None,
        connect=config.connect_timeout,
        sock_connect=config.connect_timeout,
        sock_read=config.response_timeout,
        body_read=config.read_timeout,
        head=config.response_head_timeout,
    )
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,  # bytes pass through with their Content-Encoding
        cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
        # A body's read buffer stops reading the socket at twice this: `stream_buffer_size`.
        read_bufsize=config.stream_buffer_size // 2,
    ) as session:
        app[CLIENT_SESSION] = session
        yield


async def fleet_watchers(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the engine-stats scraper, the health prober and the KV event feeds, as
    background tasks with a session of their own, so their calls never share (or show up in)
    the proxy's pool; `kvaware`'s `/tokenize` calls use that session too. The KV event
    streams are followed only while the policy uses them."""
    config = app[CONFIG]
    pool = app[POOL]
    key = config.backend_api_key
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with aiohttp.ClientSession(
        connector=GuardedConnector(), cookie_jar=aiohttp.DummyCookieJar(), headers=headers
    ) as session:
        loops = []
        if config.engine_stats_interval > 0:
            loops.append(EngineScraper(
                app[ENGINE_STATS], pool, session,
                config.engine_stats_interval, config.engine_stats_timeout,
                config.engine_stats_max_size,
            ).run())
        if config.health_check_interval > 0:
            loops.append(HealthProber(
                app[HEALTH], pool, session, config.health_check_interval,
                config.health_check_path, config.health_check_timeout,
            ).run())
        kv = app[KV_CACHE]
        kv.tokens = PromptTokens(session, config.kv_tokenize_timeout)
        kv.feeds = KvEventFeeds(
            kv.index, pool, session,
            lambda: bool(getattr(app[CHOOSER].policy, "uses_kv_events", False)),
            config.kv_events_endpoint, config.kv_events_replay_endpoint,
        )
        loops.append(kv.feeds.run())
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            kv.tokens = None


STALL_GRACE = 5.0
"""Seconds (at most; never more than the read timeout itself) past `--read-timeout` before
the watch cuts a stalled backend read: normally aiohttp's own read timeout fires first."""


async def watch_stalls(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: cut requests whose client read nothing for `client_write_timeout` seconds
    (backpressure would otherwise hold them, and their backend request, for ever), and, as a
    backstop, those whose backend sent nothing for longer than the read timeout (should a
    future aiohttp lose a read timer as 3.14 does on a malformed chunk: see
    `router.proxy.upstream_pool.PooledHandler.set_exception`)."""
    config = app[CONFIG]
    write_limit = config.client_write_timeout
    read_limit = config.read_timeout + min(STALL_GRACE, config.read_timeout)

    async def watch() -> None:
        while True:
            await asyncio.sleep(min(5.0, write_limit / 4, read_limit / 4))
            for task, flow, side in app[LIVE_REQUESTS].stalled(write_limit, read_limit):
                if side == "client":
                    flow.outcome = Outcome.CLIENT_DISCONNECTED
                    flow.error = f"the client read nothing for {write_limit:g} s"
                else:
                    flow.outcome = Outcome.TIMEOUT
                    flow.error = f"the backend sent nothing for {read_limit:g} s"
                log.warning("request %s: %s; cutting it", flow.id, flow.error)
                if flow.request is not None:
                    cut_client(flow.request)
                task.cancel()

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def close_plugins(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: plugin calls still running finish before the app goes."""
    yield
    plugins = app[PLUGINS]
    if plugins is not None:
        await plugins.aclose()


async def publish_fleet_gauges(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (--workers only): this worker's fleet gauges, published every second."""
    publisher = app[FLEET_PUBLISHER]
    assert publisher is not None
    task = asyncio.create_task(publisher.run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def forget_backends(app: web.Application, removed: frozenset[str]) -> None:
    """Backends left the pool: drop what health and the routing policy kept for them."""
    forget_in_policy = getattr(app[CHOOSER].policy, "forget_backend", None)
    for backend_id in removed:
        app[HEALTH].forget(backend_id)
        if forget_in_policy is not None:
            forget_in_policy(backend_id)


def make_app(config: Config) -> web.Application:
    api_keys = ApiKeys(config.api_keys)
    refusals: list[Callable[[], None]] = []
    middlewares: list[Middleware] = [
        guard(config.max_headers_total_size),
        json_errors,
        # Always there, so a reload can add keys; without keys it checks one flag.
        auth_middleware(api_keys, config.protect_admin,
                        lambda: refusals[0]() if refusals else None),
    ]
    app = web.Application(client_max_size=config.max_json_body_size, middlewares=middlewares)
    app[API_KEYS] = api_keys
    app[ADMISSION] = (
        Admission(config.max_concurrent_requests, config.queue_size, config.queue_timeout)
        if config.max_concurrent_requests else None
    )
    app[RATE_LIMITER] = (
        RateLimiter(config.rate_limit, config.rate_limit_burst) if config.rate_limit else None
    )
    # External providers stay in the pool whatever discovery finds (external-only: alone).
    pool = BackendPool(aliases=config.aliases,
                       fixed=external_backends(config.external_providers))
    stats = RequestStats(config.request_stats_window)
    health = HealthTracker(config.cb_failure_threshold, config.cb_cooldown,
                           max_ejection_percent=config.max_ejection_percent)
    engine_stats = EngineStats()
    metrics = Metrics(stats, pool, health, multiprocess=config.metrics_dir is not None,
                      engine_stats=engine_stats)
    app[KV_CACHE] = kv_cache = KvCache(KvIndex(config.kv_index_max_blocks))
    metrics.add_gauges(KvGauges(pool, kv_cache))
    policy = make_policy(config.routing_logic,
                         PolicyContext(config, stats, engine_stats, kv_cache))
    app[CONFIG] = config
    app[LIVE_REQUESTS] = LiveRequests()
    app[UPSTREAM_AUTH] = UpstreamAuth(config.forward_client_auth, config.backend_api_key)
    app[RETRY_BUDGET] = RetryBudget(config.retry_budget_percent, config.retry_budget_min)
    app[PREFILL_HOP] = PrefillHop(config.prefill_timeout, config.prefill_max_answer_size)
    app[POOL] = pool
    discovery = "demo" if config.demo else config.service_discovery
    app[RUNTIME_WORKERS] = RuntimeWorkers(pool, discovery)
    app[STATS] = stats
    app[ENGINE_STATS] = engine_stats
    app[METRICS] = metrics
    refusals.append(metrics.count_unauthorized)
    app[PLUGINS] = None
    if config.callbacks:
        plugins = PluginHost(load_object(spec, "--callbacks") for spec in config.callbacks)
        app[PLUGINS] = plugins
        app.cleanup_ctx.append(close_plugins)
    app[REWRITER] = (
        cast(RequestRewriter, load_object(config.request_rewriter, "--request-rewriter"))
        if config.request_rewriter else None
    )
    app[FLEET_PUBLISHER] = None
    if config.metrics_dir is not None:
        app[FLEET_PUBLISHER] = FleetPublisher(metrics, config.metrics_dir)
        app.cleanup_ctx.append(publish_fleet_gauges)
    app[HEALTH] = health
    app[CHOOSER] = BackendChooser(pool, policy, health)
    # AccessLog after Metrics: it reuses the usage Metrics parsed from the flow's tail.
    app[RESPONSE_HOMES] = homes = ResponseHomes()
    app[EVENTS] = RequestEvents([stats, health, metrics, AccessLog(), policy, homes])
    if (plugins_host := app[PLUGINS]) is not None:
        plugins_host.subscribe(app[EVENTS])
    if config.otel_endpoint:  # without it OpenTelemetry is never imported
        tracer = make_tracer(config.otel_endpoint, config.otel_service_name,
                             config.otel_secure, config.otel_protocol)
        app[EVENTS].subscribe(tracer)
        app.cleanup_ctx.append(tracer.lifetime)
    pool.on_removed(lambda removed: forget_backends(app, removed))
    if config.demo:
        # Imported here so the fake engines are loaded only in demo mode.
        from router.discovery.demo import demo_engines

        app.cleanup_ctx.append(demo_engines)
    elif config.service_discovery == "k8s":
        assert config.k8s is not None
        app.cleanup_ctx.append(kubernetes_discovery(pool, config.k8s))
    else:
        pool.replace(static_backends(config))
    app.cleanup_ctx.append(client_session)
    app.cleanup_ctx.append(fleet_watchers)
    app.cleanup_ctx.append(watch_stalls)
    if config.enable_batch_api:
        # After client_session: batch lines use the session until their runners stop.
        app[BATCHES] = batch.Batches(app, config.file_storage_path, config.batch_concurrency)
        app.cleanup_ctx.append(batch.run_batches)
        batch.add_routes(app)
    if config.log_stats:
        from router.stats.summary import log_stats

        app.cleanup_ctx.append(log_stats)
    openai.add_routes(app)
    realtime.add_routes(app)
    admin.add_routes(app)
    engine_admin.add_routes(app)
    dashboard.add_routes(app)
    workers.add_routes(app)
    return app
